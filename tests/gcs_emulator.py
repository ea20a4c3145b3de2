"""A real GCS JSON API on loopback (the gcp-storage-emulator package), for gs:// workdir tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


# gcp-storage-emulator leaves out two things of GCS's download API that TensorStore (Orbax's array
# store) relies on for its conditional reads of OCDBT manifests: the x-goog-generation header, and
# a 304 for ifGenerationNotMatch on the current generation. Without them about one save in seven
# failed with "Malformed StorageGeneration". The launcher adds both before the server starts.
_LAUNCHER = r"""
import sys
from http import HTTPStatus
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return _download(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table
from gcp_storage_emulator.__main__ import main  # noqa: E402

main(sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """Starts the emulator in memory with one bucket; `env` points gcsfs, TensorStore (Orbax's
    array store) and tensorboardX at it."""

    def __init__(self, bucket: str = "tspo-test"):
        self.port = _free_port()
        self.bucket = bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, "start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory", f"--default-bucket={bucket}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the GCS emulator did not start (pip install gcp-storage-emulator)")
                time.sleep(0.2)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage (tensorboardX)
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # Orbax's arrays
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no metadata-server lookup
            "FSSPEC_GCS_TOKEN": "anon",
            # gcsfs's bucket-type probe speaks gRPC, which the emulator does not serve.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
