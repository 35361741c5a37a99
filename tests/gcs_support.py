"""A real GCS-compatible server for tests: ``gcp-storage-emulator`` (from the package index) in its own
process on 127.0.0.1, with gcsfs, orbax (through etils' fsspec backend) and tensorstore's GCS driver pointed
at it by environment variables, which subprocesses (``train.py`` runs) inherit.

The emulator lacks two pieces of GCS behaviour that checkpoints and the lease depend on; the server script
adds them (see ``_SERVER``). It also lacks GCS's ``moveTo``, which nothing here uses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

BUCKET = "ipadapter-test"

# Two things real GCS does that the emulator leaves out, added in front of its handlers (GCS's documented
# behaviour, not ours): media downloads carry the object's generation in x-goog-generation (tensorstore's
# GCS driver, which orbax's OCDBT checkpoints use, refuses a download without it), and uploads honour the
# ifGenerationMatch precondition (0: only if absent), answering 412 otherwise (OCDBT's manifest updates and
# the workdir lease's exclusive create rely on it).
_SERVER = """
import sys, time
from http import HTTPStatus
from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

def current_generation(request, storage, name):
    try:
        return storage.get_file_obj(request.params["bucket_name"], name)["generation"]
    except NotFound:
        return "0"

def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage, *args, **kwargs)
    generation = current_generation(request, storage, request.params["object_id"])
    if generation != "0":
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"

def insert(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    name = request.query["name"][0] if "name" in request.query else (
        request.data.get("meta", {}).get("name") if isinstance(request.data, dict) else None)
    if wanted and name:
        if current_generation(request, storage, name) != wanted[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
            return
    plain_insert(request, response, storage, *args, **kwargs)

plain_download, plain_insert = objects.download, objects.insert
objects.download = download  # objects.get calls it by name for ?alt=media
for _, methods in emulator.HANDLERS:
    for method, handler in list(methods.items()):
        methods[method] = {plain_download: download, plain_insert: insert}.get(handler, handler)

server = emulator.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(port: int) -> dict[str, str]:
    """The variables that point every GCS client used here at the server on ``port``."""
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array files
        "FSSPEC_GCS_TOKEN": "anon",  # no credential lookup (it would probe the metadata server)
        "EPATH_USE_TF": "false",  # orbax's paths through fsspec: tf.io.gfile ignores the emulator
        # gcsfs otherwise asks a gRPC control API whether the bucket is hierarchical (60 s of retries)
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


class GcsServer:
    def __init__(self):
        self.port = _free_port()
        self.process = subprocess.Popen([sys.executable, "-c", _SERVER, str(self.port), BUCKET],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if "ready" not in line:
            raise RuntimeError("the GCS emulator did not start")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.env = client_env(self.port)

    def fresh_url(self, name: str = "run") -> str:
        """A ``gs://`` folder no other test uses."""
        return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"

    def activate(self) -> None:
        """Point this process's clients at the server (and drop gcsfs instances made before)."""
        os.environ.update(self.env)
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        try:
            import gcsfs

            gcsfs.GCSFileSystem.clear_instance_cache()
        except ImportError:
            pass

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
