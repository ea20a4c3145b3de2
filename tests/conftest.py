"""Test setup: eight fake CPU devices for mesh tests, fp32 matmuls for parity tests."""

import gc
import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def gcs():
    """A GCS API on loopback (tests/gcs_emulator.py), with gcsfs, TensorStore and tensorboardX
    pointed at it for the module's tests: gs://{gcs.bucket}/... paths then work."""
    from tests.gcs_emulator import GcsEmulator

    emulator = GcsEmulator()
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        gc.collect()  # writers that upload when collected must do so before the server goes
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emulator.close()
