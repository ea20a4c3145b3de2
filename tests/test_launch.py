"""launch/*.sh: the commands they print with --dry-run, and that without it they run exactly those.

gcloud and the Python interpreters are replaced by recording fakes on PATH, so nothing here
touches a cloud or a GPU. Each script prints the commands it runs as "+ CMD" shell lines.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SEP = "\x1f"  # separates the recorded arguments of one call
JAX_VERSION = re.search(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)

FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\x1f' gcloud "$@" >> "$RECORD"; printf '\n' >> "$RECORD"
case "$*" in
  *describe*networkEndpoints*) echo 10.1.2.3 ;;
  *describe*) [[ -n ${FAKE_TPU_MISSING-} ]] && exit 1; echo READY ;;
esac
exit 0
"""
# A Python stand-in: the retrieval server "starts" (and stays up a moment), /health answers once
# it has, everything else succeeds. The trainer's environment is saved beside the record.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\x1f' python "$@" >> "$RECORD"; printf '\n' >> "$RECORD"
case "$*" in
  *tspo_jax.retrieval.server*) touch "$RECORD.up"; exec sleep 3 ;;
  *urllib.request*) [[ -f $RECORD.up ]] ;;
  *tspo_jax.train*) env > "$RECORD.train_env" ;;
esac
"""


@pytest.fixture
def fakes(tmp_path):
    """PATH with fake gcloud/python3.11, a fake venv, and the file every fake call is recorded in."""
    bin_dir = tmp_path / "bin"
    venv_bin = tmp_path / "venv" / "bin"
    for d in (bin_dir, venv_bin):
        d.mkdir(parents=True)
    for path, text in (
        (bin_dir / "gcloud", FAKE_GCLOUD),
        (bin_dir / "python3.11", FAKE_PYTHON),
        (venv_bin / "python", FAKE_PYTHON),
    ):
        path.write_text(text)
        path.chmod(0o755)
    record = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record), TMPDIR=str(tmp_path))
    for var in ("FAKE_TPU_MISSING", "PYTHON"):
        env.pop(var, None)
    return {
        "env": env,
        "record": record,
        "venv": tmp_path / "venv",
        "python": str(venv_bin / "python"),
        "tmp": tmp_path,
    }


def run(script: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def printed(stdout: str) -> list[str]:
    """The "+ CMD" lines (nested scripts indent theirs)."""
    return [line.strip()[2:] for line in stdout.splitlines() if line.strip().startswith("+ ")]


def calls(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [line.split(SEP)[:-1] for line in record.read_text().splitlines()]


def remote_commands(lines: list[str]) -> list[str]:
    """The --command=... of every `gcloud ... ssh` line, each checked to be valid bash."""
    out = []
    for line in lines:
        argv = shlex.split(line)
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            assert "--worker=all" in argv, line
            (cmd,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
            syntax = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert syntax.returncode == 0, (cmd, syntax.stderr)
            out.append(cmd)
    return out


def one(items, pred):
    found = [x for x in items if pred(x)]
    assert len(found) == 1, found
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TPU_ARGS = (
    "--name=tspo-v4",
    "--zone=us-central2-b",
    "--accelerator=v4-32",
    "--config=configs/qwen2_5_3b_tspo.py:tpu_v4_32",
    "--workdir=/mnt/shared/runs/3b",
    "--index=/mnt/idx",
    "--port=8123",
    "--model-dir=~/Qwen2.5-3B",
    "--model-gcs=gs://bucket/Qwen2.5-3B",
    "--data-dir=/mnt/data",
)


# --- tpu_pod.sh ---------------------------------------------------------------------------------------
def test_tpu_pod_dry_run_prints_the_launch_and_runs_nothing(fakes):
    out = run("tpu_pod.sh", "--dry-run", *TPU_ARGS, "--", "--config.total_steps=200", env=fakes["env"]).stdout
    lines = printed(out)
    assert calls(fakes["record"]) == []  # neither gcloud nor python ran

    create = one(lines, lambda line: " create " in line)
    assert create.startswith("gcloud compute tpus tpu-vm describe tspo-v4 --zone=us-central2-b")
    assert create.endswith(
        "|| gcloud compute tpus tpu-vm create tspo-v4 --zone=us-central2-b "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )
    scp = shlex.split(one(lines, lambda line: " scp " in line))
    assert "--worker=all" in scp and "tspo-v4:tspo_jax_code.tgz" in scp

    remote = remote_commands(lines)
    install = one(remote, lambda c: "pip install" in c)
    assert f"jax[tpu]=={JAX_VERSION}" in shlex.split(install) and "requirements.txt" in install
    fetch = one(remote, lambda c: "gcloud storage rsync" in c)
    assert shlex.split(fetch)[-2:] == ["gs://bucket/Qwen2.5-3B", "$HOME/Qwen2.5-3B"]  # ~ expands remotely
    serve = shlex.split(one(remote, lambda c: "retriever_server.sh" in c))
    assert serve[serve.index("bash") :] == [
        "bash",
        "launch/retriever_server.sh",
        "--index=/mnt/idx",
        "--port=8123",
        "--python=.venv/bin/python",
        "--background",
    ]
    train = shlex.split(one(remote, lambda c: "tspo_jax.train" in c))
    start = train.index(".venv/bin/python")
    assert train[start : start + 13] == [
        ".venv/bin/python",
        "-m",
        "tspo_jax.train",
        "--config=configs/qwen2_5_3b_tspo.py:tpu_v4_32",
        "--workdir=/mnt/shared/runs/3b",
        "--config.retriever.spec=http://127.0.0.1:8123",
        "--config.model.checkpoint=$HOME/Qwen2.5-3B",
        "--config.data.train=/mnt/data/train.parquet",
        "--config.data.test=/mnt/data/test.parquet",
        "--config.total_steps=200",
        ">",
        "$HOME/tspo_train.log",
        "2>&1",
    ]
    assert "JAX_COORDINATOR_ADDRESS=<worker-0-ip>:8476" in train and train[-1] == "&"  # detached
    assert one(lines, lambda line: line.startswith("WORKER0_IP=")).endswith(
        "'--format=value(networkEndpoints[0].ipAddress)')"
    )


def normalized(argv: list[str], ip: str = "10.1.2.3") -> list:
    """argv with each --command=... split into its words too, and the dry-run's IP placeholder filled."""
    return [
        ["--command=", *[w.replace("<worker-0-ip>", ip) for w in shlex.split(a[len("--command=") :])]]
        if a.startswith("--command=")
        else a
        for a in argv
    ]


def test_tpu_pod_runs_exactly_what_the_dry_run_prints(fakes):
    dry = printed(run("tpu_pod.sh", "--dry-run", *TPU_ARGS, env=fakes["env"]).stdout)
    real = printed(run("tpu_pod.sh", *TPU_ARGS, env=fakes["env"]).stdout)
    assert [normalized(shlex.split(x)) for x in real] == [normalized(shlex.split(x)) for x in dry]
    expected = []
    for line in dry:
        if line.startswith("git "):
            continue  # the local tarball, checked below
        if line.startswith("WORKER0_IP=$("):
            line = line[len("WORKER0_IP=$(") : -1]
        if line.startswith("gcloud compute tpus tpu-vm describe tspo-v4") and " || " in line:
            line = line.split(" || ")[0]  # the TPU exists (fake describe says READY): no create
        expected.append(normalized(shlex.split(line)))
    assert [normalized(c) for c in calls(fakes["record"])] == expected
    train = expected[-1][-1]
    assert "JAX_COORDINATOR_ADDRESS=10.1.2.3:8476" in train
    with tarfile.open(fakes["tmp"] / "tspo_jax_code_tspo-v4.tgz") as tar:
        names = set(tar.getnames())
    assert {
        "launch/tpu_pod.sh",
        "configs/qwen2_5_3b_tspo.py",
        "tspo_jax/train.py",
        "requirements.txt",
    } <= names
    assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)


def test_tpu_pod_creates_a_missing_tpu(fakes):
    env = dict(fakes["env"], FAKE_TPU_MISSING="1")
    run(
        "tpu_pod.sh",
        *TPU_ARGS,
        "--accelerator=v5litepod-64",
        "--spot",
        "--project=proj",
        "--skip-install",
        "--attach",
        env=env,
    )
    recorded = calls(fakes["record"])
    assert recorded[1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "tspo-v4",
        "--zone=us-central2-b",
        "--project=proj",
        "--accelerator-type=v5litepod-64",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    remote = [a for c in recorded for a in c if a.startswith("--command=")]
    assert not any("pip install" in c for c in remote)  # --skip-install
    assert remote[-1].endswith('2>&1 | tee "$HOME/tspo_train.log"')  # --attach: stays in the foreground


def test_tpu_pod_with_an_external_retriever_starts_none(fakes):
    args = [a for a in TPU_ARGS if not a.startswith("--index")]
    lines = printed(
        run("tpu_pod.sh", "--dry-run", *args, "--retriever-url=http://10.0.0.9:8000", env=fakes["env"]).stdout
    )
    remote = remote_commands(lines)
    assert not any("retriever_server.sh" in c for c in remote)
    assert "--config.retriever.spec=http://10.0.0.9:8000" in shlex.split(remote[-1])


# --- gpu_node.sh --------------------------------------------------------------------------------------
def _fake_index(tmp: Path) -> Path:
    index = tmp / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    return index


def test_gpu_node_dry_run_prints_install_retriever_and_train(fakes):
    index = _fake_index(fakes["tmp"])
    out = run(
        "gpu_node.sh",
        "--dry-run",
        "--workdir=runs/q3b",
        f"--index={index}",
        "--port=8124",
        "--gpus=4",
        "--model-dir=/models/Qwen2.5-3B",
        "--data-dir=/data/nq_hotpotqa_train",
        f"--venv={fakes['venv']}",
        "--config=configs/qwen2_5_3b_tspo.py:fsdp_any",
        "--",
        "--config.total_steps=3",
        env=fakes["env"],
    ).stdout
    lines = printed(out)
    assert calls(fakes["record"]) == []
    py = fakes["python"]
    assert lines[:3] == [
        f"{py} -m pip install -q -r {ROOT}/requirements.txt",
        f"{py} -m pip install -q 'jax[cuda12]=={JAX_VERSION}'",
        f"{py} -m pip install -q --no-deps -e {ROOT}",
    ]
    assert (
        lines[3]
        == f"bash {LAUNCH}/retriever_server.sh --index={index} --port=8124 --python={py} --background"
    )
    server = shlex.split(one(lines, lambda line: "tspo_jax.retrieval.server" in line))
    assert server[:3] == ["nohup", "env", "JAX_PLATFORMS=cpu"]
    assert server[3:12] == [
        py,
        "-m",
        "tspo_jax.retrieval.server",
        f"--index={index}",
        "--host=127.0.0.1",
        "--port=8124",
        "--topk=3",
        "--batch_size=64",
        ">",
    ]
    assert shlex.split(lines[-1]) == [
        "env",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
        "CUDA_VISIBLE_DEVICES=0,1,2,3",
        py,
        "-m",
        "tspo_jax.train",
        "--config=configs/qwen2_5_3b_tspo.py:fsdp_any",
        "--workdir=runs/q3b",
        "--config.retriever.spec=http://127.0.0.1:8124",
        "--config.model.checkpoint=/models/Qwen2.5-3B",
        "--config.data.train=/data/nq_hotpotqa_train/train.parquet",
        "--config.data.test=/data/nq_hotpotqa_train/test.parquet",
        "--config.total_steps=3",
    ]


def test_gpu_node_runs_exactly_what_the_dry_run_prints(fakes):
    index = _fake_index(fakes["tmp"])
    args = (
        "--workdir=runs/q3b",
        f"--index={index}",
        f"--port={free_port()}",
        "--gpus=2",
        f"--venv={fakes['venv']}",
    )
    dry = printed(run("gpu_node.sh", "--dry-run", *args, env=fakes["env"]).stdout)
    real = run("gpu_node.sh", *args, env=fakes["env"]).stdout
    assert "retriever up on" in real
    health = [c for c in calls(fakes["record"]) if any("urllib.request" in a for a in c)]
    assert health, "the script waits for /health"
    ran = [c for c in calls(fakes["record"]) if c not in health]
    expected = []
    for line in dry:
        argv = shlex.split(line)
        if argv[0] == "bash" or "urllib.request" in line:
            continue
        if argv[0] == "nohup":  # the detached server: `nohup env VAR=... PY ARGS > LOG ...`
            argv = argv[3 : argv.index(">")]
        if argv[0] == "env":
            argv = [a for a in argv[1:] if "=" not in a or a.startswith("-")]
        expected.append(["python", *argv[1:]])
    assert ran == expected
    env_lines = (fakes["tmp"] / "calls.txt.train_env").read_text().splitlines()
    train_env = dict(x.split("=", 1) for x in env_lines if "=" in x)
    assert (
        train_env["CUDA_VISIBLE_DEVICES"] == "0,1" and train_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
    )


# --- retriever_server.sh ------------------------------------------------------------------------------
def test_retriever_dry_run_builds_a_missing_index_then_serves(fakes):
    index = fakes["tmp"] / "e5_index"
    out = run(
        "retriever_server.sh",
        "--dry-run",
        f"--index={index}",
        "--corpus=/data/wiki-18.jsonl",
        "--encoder=/models/e5-base-v2",
        "--query-prefix=query: ",
        "--passage-prefix=passage: ",
        "--mode=scann",
        "--host=0.0.0.0",
        "--port=8125",
        f"--python={fakes['python']}",
        env=fakes["env"],
    ).stdout
    build, serve = (shlex.split(x) for x in printed(out))
    assert calls(fakes["record"]) == [] and not index.exists()
    assert build == [
        "env",
        "JAX_PLATFORMS=cpu",
        fakes["python"],
        "-m",
        "tspo_jax.retrieval.build_index",
        "--corpus=/data/wiki-18.jsonl",
        f"--out={index}",
        "--mode=scann",
        "--batch_size=64",
        "--overwrite",
        "--encoder=/models/e5-base-v2",
        "--query_prefix=query: ",
        "--passage_prefix=passage: ",
    ]
    assert serve == [
        "env",
        "JAX_PLATFORMS=cpu",
        fakes["python"],
        "-m",
        "tspo_jax.retrieval.server",
        f"--index={index}",
        "--host=0.0.0.0",
        "--port=8125",
        "--topk=3",
        "--batch_size=64",
    ]


def test_retriever_with_a_finished_index_only_serves(fakes):
    index = _fake_index(fakes["tmp"])
    out = run(
        "retriever_server.sh",
        "--dry-run",
        f"--index={index}",
        "--port=8126",
        "--platform=any",
        "--background",
        env=fakes["env"],
    ).stdout
    lines = printed(out)
    assert not any("build_index" in x for x in lines)
    assert lines[0] == (
        f"nohup env python -m tspo_jax.retrieval.server --index={index} --host=127.0.0.1 "
        f"--port=8126 --topk=3 --batch_size=64 > {fakes['tmp']}/tspo_retriever_8126.log 2>&1 "
        f"< /dev/null & echo $! > {fakes['tmp']}/tspo_retriever_8126.pid"
    )
    assert "http://127.0.0.1:8126/health" in lines[1]


@pytest.mark.slow
def test_retriever_builds_and_serves_the_demo_corpus(tmp_path):
    """The real thing: MiniLM index of the demo corpus, a detached server, one Search-R1 request."""
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHON=sys.executable)
    corpus = ROOT / "tspo_jax" / "demo_task" / "corpus.jsonl"
    run(
        "retriever_server.sh",
        f"--index={tmp_path / 'index'}",
        f"--corpus={corpus}",
        f"--port={port}",
        "--background",
        "--wait=300",
        env=env,
    )
    pid = int((tmp_path / f"tspo_retriever_{port}.pid").read_text())
    try:
        body = json.dumps({"queries": ["Pelir Masom"], "topk": 2, "return_scores": True}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/retrieve", data=body, headers={"Content-Type": "application/json"}
        )
        hits = json.loads(urllib.request.urlopen(req, timeout=60).read())["result"][0]
        assert len(hits) == 2 and hits[0]["document"]["contents"].startswith("Pelir Masom\n")
        again = run(
            "retriever_server.sh", f"--index={tmp_path / 'index'}", f"--port={port}", "--background", env=env
        ).stdout
        assert "already answers" in again and "build_index" not in again
    finally:
        os.kill(pid, 15)


# --- errors and helpers ---------------------------------------------------------------------------------
MISSING = [
    ("tpu_pod.sh", "--name", [a for a in TPU_ARGS if not a.startswith("--name")]),
    ("tpu_pod.sh", "--zone", [a for a in TPU_ARGS if not a.startswith("--zone")]),
    ("tpu_pod.sh", "--accelerator", [a for a in TPU_ARGS if not a.startswith("--accelerator")]),
    ("tpu_pod.sh", "--config", [a for a in TPU_ARGS if not a.startswith("--config")]),
    ("tpu_pod.sh", "--workdir", [a for a in TPU_ARGS if not a.startswith("--workdir")]),
    ("tpu_pod.sh", "--index", [a for a in TPU_ARGS if not a.startswith("--index")]),
    ("gpu_node.sh", "--workdir", ["--index=/x"]),
    ("gpu_node.sh", "--index", ["--workdir=runs/x"]),
    ("retriever_server.sh", "--index", ["--port=8000"]),
]


@pytest.mark.parametrize("script,flag,args", MISSING, ids=[f"{s}{f}" for s, f, _ in MISSING])
def test_missing_required_flag_is_a_clear_error(script, flag, args, fakes):
    proc = run(script, "--dry-run", *args, env=fakes["env"], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"missing required flag {flag}" in proc.stderr and "see --help" in proc.stderr
    assert calls(fakes["record"]) == []


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu_pod.sh", [*TPU_ARGS, "--zonee=x"], "unknown flag --zonee"),
        (
            "tpu_pod.sh",
            [*TPU_ARGS, "--accelerator=v9-8"],
            "no default TPU software version for --accelerator=v9-8",
        ),
        ("tpu_pod.sh", [*TPU_ARGS, "--config=configs/nope.py"], "no file configs/nope.py"),
        ("tpu_pod.sh", [*TPU_ARGS, "--index-gcs=gs://b/i", "--index="], "missing required flag --index"),
        ("gpu_node.sh", ["--workdir=w", "--index=/x", "--gpus=0"], "--gpus=0 must be a positive number"),
        ("gpu_node.sh", ["--workdir=w", "--index"], "--index needs a value"),
        (
            "retriever_server.sh",
            ["--index=/nonexistent/idx"],
            "no finished index (no manifest.json): pass --corpus",
        ),
        ("retriever_server.sh", ["--index=/x", "--platform=tpu"], "--platform=tpu: choose cpu or any"),
    ],
)
def test_bad_flags_are_clear_errors(script, args, message, fakes):
    proc = run(script, "--dry-run", *args, env=fakes["env"], check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_node.sh", "retriever_server.sh"])
def test_help_and_syntax(script, fakes):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    proc = run(script, "--help", env=fakes["env"])
    assert proc.stdout.startswith(f"Usage: bash launch/{script}") and "--dry-run" in proc.stdout


def test_quote_matches_pythons_shlex():
    words = ["plain", "", "a b", "it's", "$HOME", "--k=v", "x;y", "tab\there", "'", '"q"', "a*b", "~/x", "ü"]
    script = f'source {shlex.quote(str(LAUNCH / "common.sh"))}; for w in "$@"; do quote "$w"; echo; done'
    out = subprocess.run(
        ["bash", "-c", script, "_", *words], capture_output=True, text=True, check=True
    ).stdout
    quoted = out.split("\n")[:-1]
    assert [shlex.split(q) for q in quoted] == [[w] for w in words]
    assert quoted[:-1] == [shlex.quote(w) for w in words[:-1]]  # shlex also leaves non-ASCII letters bare


def test_remote_paths_expand_on_the_worker():
    script = f'source {shlex.quote(str(LAUNCH / "common.sh"))}; for w in "$@"; do quote_remote_path "$w"; echo; done'
    words = ["~/runs/a b", "~", "/abs/x", "rel/y", '~/q"$`\\z']
    out = subprocess.run(
        ["bash", "-c", script, "_", *words], capture_output=True, text=True, check=True
    ).stdout
    quoted = out.split("\n")[:-1]
    home = "/home/worker"
    echoed = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + " ".join(quoted)],
        capture_output=True,
        text=True,
        env={"HOME": home, "PATH": os.environ["PATH"]},
        check=True,
    ).stdout.split("\n")[:-1]
    assert echoed == [f"{home}/runs/a b", home, "/abs/x", "rel/y", f'{home}/q"$`\\z']


def test_tpu_pod_plans_the_slice_before_training_unless_skipped(fakes):
    lines = printed(run("tpu_pod.sh", "--dry-run", *TPU_ARGS, "--", "--config.micro_batch=16", env=fakes["env"]).stdout)
    remote = remote_commands(lines)
    plan = shlex.split(one(remote, lambda c: "tspo_jax.plan" in c).split("&& ", 1)[1])
    assert plan == ["JAX_PLATFORMS=cpu", ".venv/bin/python", "-m", "tspo_jax.plan",
                    "--config=configs/qwen2_5_3b_tspo.py:tpu_v4_32", "--topology=v4-32", "--config.micro_batch=16"]
    # before the training command
    assert remote.index(one(remote, lambda c: "tspo_jax.plan" in c)) < remote.index(
        one(remote, lambda c: "tspo_jax.train" in c))
    skipped = remote_commands(printed(run("tpu_pod.sh", "--dry-run", "--skip-plan", *TPU_ARGS, env=fakes["env"]).stdout))
    assert not any("tspo_jax.plan" in c for c in skipped)
