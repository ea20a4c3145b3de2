"""The embedded demo with the GRPO baseline advantage (everything else as configs/demo.py)."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("tspo_demo_config", os.path.join(os.path.dirname(__file__), "demo.py"))
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config():
    c = _demo.get_config()
    c.advantage.name = "grpo"
    return c
