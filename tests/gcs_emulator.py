"""A real GCS JSON API on loopback (the gcp-storage-emulator package), for gs:// workdir tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """Starts the emulator in memory with one bucket; `env` points gcsfs, TensorStore (Orbax's
    array store) and tensorboardX at it."""

    def __init__(self, bucket: str = "tspo-test"):
        exe = shutil.which("gcp-storage-emulator") or os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
        self.port = _free_port()
        self.bucket = bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [exe, "start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory", f"--default-bucket={bucket}"],
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
