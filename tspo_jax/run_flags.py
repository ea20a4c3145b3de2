"""The --config / --workdir flags that train, evaluate and compare share, and their logging setup."""

from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")
STEP = flags.DEFINE_integer("step", None, "checkpoint step to read (evaluate, export; default: the latest)")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    logging.getLogger("tspo_jax").setLevel(logging.INFO)  # our own progress (warm start, resume, saves)
