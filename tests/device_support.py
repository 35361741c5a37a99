"""Running a test script in a subprocess with N simulated CPU devices (``--xla_force_host_platform_device_count``
must be set before jax starts, so it cannot be done in the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_on_simulated_devices(script: str, folder: Path, devices: int = 8, timeout: float = 1200) -> dict:
    """Run ``script`` (given ``folder`` as ``sys.argv[1]``) on ``devices`` CPU devices; the JSON it prints on
    its last ``RESULT `` line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
