"""A trained policy out as a Hugging Face checkpoint (transformers, vLLM, Search-R1's evaluation).

  python -m tspo_jax.export --workdir=runs/NAME [--step=N] --out=HF_DIR [--dtype=bfloat16|float32]

Reads only the parameters of the workdir's Orbax checkpoint (the latest, or --step) and writes
safetensors, config.json, the tokenizer files and generation_config.json into HF_DIR.
"""

from __future__ import annotations

import logging

from absl import app, flags

from tspo_jax import run_flags
from tspo_jax.policy import EXPORT_DTYPES, export_workdir

_WORKDIR = run_flags.WORKDIR  # the training workdir (policy_config.json and checkpoints/), shared flag
_STEP = run_flags.STEP
_OUT = flags.DEFINE_string("out", None, "output directory for the HF checkpoint")
_DTYPE = flags.DEFINE_enum("dtype", None, list(EXPORT_DTYPES), "weight dtype (default: the trained param_dtype)")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("pass --workdir=DIR (a training workdir) and --out=HF_DIR")
    try:
        step = export_workdir(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
