"""Exact match of greedy search episodes on QA sets, per data source.

  python -m tspo_jax.evaluate --config=configs/demo.py --workdir=runs/demo [--step=N]

--workdir is a training workdir (its latest checkpoint, or --step's) or an HF checkpoint
directory. The config gives the test data, the retriever and the rollout (made greedy). Prints
the table; for a workdir also saves it beside the trainer's evaluations (eval/step_N.*), and
writes nothing else there.
"""

from __future__ import annotations

import os

from absl import app

from tspo_jax import evaluation, run_flags
from tspo_jax.runtime import Runtime

_STEP = run_flags.STEP


def evaluate(config, checkpoint_or_workdir: str, step: int | None = None) -> tuple[Runtime, dict]:
    rt = Runtime.for_inference(checkpoint_or_workdir, config=config, step=step)
    try:
        examples = rt.test_examples[: config.eval.max_examples]
        if not examples:
            raise ValueError("config.data.test is empty: there is nothing to evaluate on")
        result = evaluation.evaluate_examples(rt.runner, rt.params, examples, batch_size=config.eval.batch_size)
    finally:
        rt.close()
    return rt, result


def main(argv):
    del argv
    run_flags.setup_logging()
    if run_flags.CONFIG.value is None or not run_flags.WORKDIR.value:
        raise app.UsageError("pass --config=configs/NAME.py and --workdir=DIR (a training workdir or an HF checkpoint)")
    rt, result = evaluate(run_flags.CONFIG.value, run_flags.WORKDIR.value, _STEP.value)
    if rt.source == "hf":
        print(f"{rt.workdir} (HF checkpoint)\n" + evaluation.format_table(result["metrics"]))
        return
    evaluation.save_table(result, os.path.join(rt.workdir, "eval"), f"step_{rt.step}")
    print(f"step {rt.step}\n" + evaluation.format_table(result["metrics"]))


if __name__ == "__main__":
    app.run(main)
