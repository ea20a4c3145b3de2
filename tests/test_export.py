"""python -m tspo_jax.export: a trained workdir's policy as an HF checkpoint that transformers loads."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import hf_logits
from test_train import tiny_config
from tspo_jax.policy import export_workdir
from tspo_jax.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo workdir trained for 2 steps (a checkpoint at each), and its final policy."""
    root = tmp_path_factory.mktemp("export")
    config = tiny_config(str(root / "index"), **{"eval.every": 0, "total_steps": 2})
    trainer = Trainer(config, str(root / "run"))
    try:
        trainer.train()
    finally:
        trainer.close()
    return str(root / "run"), nnx.merge(trainer.rt.graphdef, trainer.params), trainer.rt.tokenizer


def _ours(model, ids):
    return np.asarray(model(jnp.asarray(ids))[0], np.float32)


def test_exported_workdir_reloads_in_transformers_with_our_logits(trained, tmp_path):
    workdir, model, tok = trained
    out = str(tmp_path / "hf")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tspo_jax.export", f"--workdir={workdir}", f"--out={out}",
                           "--dtype=float32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported step 2" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    hf = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.RandomState(0).randint(0, tok.vocab_size, (3, 17))
    diff = np.abs(hf_logits(hf, ids) - _ours(model, ids)).max()
    assert diff < 1e-5, diff
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert tok.eos_id in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Question: In which city was Thadur Lihan born?"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_export_step_and_dtype(trained, tmp_path):
    workdir, model, _ = trained
    assert export_workdir(workdir, str(tmp_path / "s1"), step=1) == 1
    first = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "s1"), dtype=torch.float32).eval()
    ids = np.random.RandomState(1).randint(0, 200, (2, 9))
    assert np.abs(hf_logits(first, ids) - _ours(model, ids)).max() > 1e-6  # step 1 is not step 2
    export_workdir(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7.*\[1, 2\]"):
        export_workdir(workdir, str(tmp_path / "none"), step=7)
    with pytest.raises(ValueError, match="dtype"):
        export_workdir(workdir, str(tmp_path / "none"), dtype="float16")
