#!/usr/bin/env bash
# Trains on one machine with N NVIDIA GPUs: installs tspo_jax with jax[cuda12] (pinned to
# requirements.txt's jax) into a venv, starts the retrieval server on the CPU, runs tspo_jax.train.
# Run it on the GPU machine (usually from the repository root: relative paths are taken from the
# current directory).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/gpu_node.sh --workdir=DIR (--index=DIR | --retriever-url=URL) [flags] [-- TRAIN_FLAGS...]

  --config=FILE[:MESH]   default configs/qwen2_5_3b_tspo.py:gpu8 (8 GPUs; see MESHES in that file)
  --workdir=DIR          checkpoints, metrics, plots (required); rerunning with it resumes
  --index=DIR            retrieval index to serve (built from --corpus if missing)
  --corpus=FILE          corpus JSONL to build --index from
  --encoder=DIR          encoder to build the index with (e.g. an e5-base-v2 checkpoint)
  --query-prefix=S --passage-prefix=S   e5: "query: " and "passage: " (index build only)
  --port=P               retriever port (default 8000)
  --retriever-url=URL    use a retriever that is already running; start none
  --model-dir=DIR        HF checkpoint -> --config.model.checkpoint (default: the config's, $TSPO_MODEL_DIR)
  --data-dir=DIR         holds train.parquet and test.parquet -> --config.data.train / .test
  --gpus=N               use GPUs 0..N-1 (default: all); the config's mesh must fit N
  --mem-fraction=F       XLA_PYTHON_CLIENT_MEM_FRACTION for the trainer (default 0.92)
  --venv=DIR             virtual environment (default .venv in the checkout)
  --base-python=PY       Python >= 3.11 that creates the venv (default python3.11)
  --skip-install         use the venv as it is
  --dry-run              print every command, run nothing
Flags after -- go to tspo_jax.train unchanged, e.g. -- --config.total_steps=200
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

CONFIG=configs/qwen2_5_3b_tspo.py:gpu8 WORKDIR="" INDEX="" CORPUS="" ENCODER="" QUERY_PREFIX="" PASSAGE_PREFIX=""
PORT=8000 RETRIEVER_URL="" MODEL_DIR="" DATA_DIR="" GPUS="" MEM_FRACTION=0.92 VENV="$REPO/.venv"
BASE_PYTHON=python3.11 SKIP_INSTALL=0 TRAIN_EXTRA=()

while (($#)); do
  case ${1%%=*} in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    --config | --workdir | --index | --corpus | --encoder | --query-prefix | --passage-prefix | --port | \
      --retriever-url | --model-dir | --data-dir | --gpus | --mem-fraction | --venv | --base-python)
      take_flag "$@"; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag ${1%%=*}; see --help" ;;
  esac
done

require "$WORKDIR" --workdir "where checkpoints and metrics go"
[[ -n $INDEX || -n $RETRIEVER_URL ]] || die "missing required flag --index (the retrieval index to serve), or pass --retriever-url=URL of a running server; see --help"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port=$PORT must be a number"
[[ -z $GPUS || $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus=$GPUS must be a positive number"
# Paths stay relative to where you run this; a config path may also be relative to the checkout.
if [[ ! -f ${CONFIG%%:*} ]]; then
  [[ -f $REPO/${CONFIG%%:*} ]] || die "--config=$CONFIG: no file ${CONFIG%%:*} here or in $REPO"
  CONFIG=$REPO/$CONFIG
fi
PY=$VENV/bin/python

# 1. Install: the runtime requirements, then the CUDA 12 build of the same jax version.
if ((!SKIP_INSTALL)); then
  JAX_VERSION=$(pinned_jax_version "$REPO")
  [[ -x $PY ]] || run "$BASE_PYTHON" -m venv "$VENV"
  run "$PY" -m pip install -q -r "$REPO/requirements.txt"
  run "$PY" -m pip install -q "jax[cuda12]==$JAX_VERSION"
  run "$PY" -m pip install -q --no-deps -e "$REPO"
fi

# 2. The retriever (on the CPU, so the GPUs stay the trainer's), reused if already up.
if [[ -z $RETRIEVER_URL ]]; then
  retriever=(bash "$REPO/launch/retriever_server.sh" --index="$INDEX" --port="$PORT" --python="$PY" --background)
  [[ -n $CORPUS ]] && retriever+=(--corpus="$CORPUS")
  [[ -n $ENCODER ]] && retriever+=(--encoder="$ENCODER")
  [[ -n $QUERY_PREFIX ]] && retriever+=(--query-prefix="$QUERY_PREFIX")
  [[ -n $PASSAGE_PREFIX ]] && retriever+=(--passage-prefix="$PASSAGE_PREFIX")
  # Always run, also in dry-run mode: it then prints the commands it would run, indented.
  echo "+ $(quote "${retriever[@]}")"
  if ((DRY_RUN)); then
    "${retriever[@]}" --dry-run | sed 's/^/  /'
  else
    "${retriever[@]}"
  fi
  RETRIEVER_URL=http://127.0.0.1:$PORT
fi

# 3. Train.
env_vars=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
if [[ -n $GPUS ]]; then
  env_vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((GPUS - 1)))")
fi
train=(env "${env_vars[@]}" "$PY" -m tspo_jax.train --config="$CONFIG" --workdir="$WORKDIR"
  --config.retriever.spec="$RETRIEVER_URL")
[[ -n $MODEL_DIR ]] && train+=(--config.model.checkpoint="$MODEL_DIR")
[[ -n $DATA_DIR ]] && train+=(--config.data.train="$DATA_DIR/train.parquet" --config.data.test="$DATA_DIR/test.parquet")
run "${train[@]}" "${TRAIN_EXTRA[@]}"
