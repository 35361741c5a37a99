"""The benchmark scripts the README and BENCHMARKS.md quote run end to end and print their ratio lines
(at a few steps and a small size: a check that they work, not a measurement)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _bench_cache(tmp_path_factory, monkeypatch):
    """The benchmark models are written to a test folder, not the user's ~/.cache."""
    monkeypatch.setenv("IPADAPTER_JAX_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench_models"))


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_sample_bench_prints_the_ratio():
    out = _run("sample_bench.py", "--steps", "2", "--repeats", "1", "--size", "64", "--batch", "1", "--threads", "1")
    assert re.search(r"^ratio ours/diffusers: \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^ratio by best CPU time \(1 thread\): \d+\.\d\dx$", out, re.M), out


@pytest.mark.slow
def test_train_bench_prints_the_ratio():
    out = _run("train_bench.py", "--steps", "1", "--repeats", "1", "--warmup", "1", "--batch", "2",
               "--resolution", "32", "--threads", "1")
    assert re.search(r"^ratio ours/PyTorch: \d+\.\d\dx$", out, re.M), out
