#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (e.g. v4-32, v5litepod-64) from your workstation: creates the TPU
# VM unless it exists, copies this checkout to every worker, installs it with jax[tpu], starts a
# retrieval server on every worker (CPU only) and launches tspo_jax.train on all workers at once.
# Needs gcloud, logged in, with a default project or --project.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_pod.sh --name=TPU --zone=ZONE --accelerator=TYPE --config=FILE[:MESH] --workdir=DIR
                              (--index=DIR | --retriever-url=URL) [flags] [-- TRAIN_FLAGS...]

  --name=TPU             TPU VM name; reused when it exists (required)
  --zone=ZONE            e.g. us-central2-b (required)
  --accelerator=TYPE     e.g. v4-32, v5litepod-64 (required)
  --config=FILE[:MESH]   e.g. configs/qwen2_5_3b_tspo.py:tpu_v4_32 (required; the mesh must fit the slice)
  --workdir=DIR          on the workers (required). Every worker writes its checkpoint shards there,
                         so use a gs://BUCKET/PATH (read and written directly) or a directory all of
                         them share (a Filestore mount).
  --project=ID           Google Cloud project (default: gcloud's)
  --version=V            TPU software version (default by accelerator: v4 tpu-ubuntu2204-base,
                         v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                 create a Spot TPU VM
  --index=DIR            index directory on the workers (each worker serves its own copy)
  --index-gcs=gs://...   copy the index there first (gcloud storage rsync)
  --corpus=FILE          build a missing index on the workers from this corpus JSONL (small corpora)
  --port=P               retriever port on every worker (default 8000)
  --retriever-url=URL    use a retriever that is already running (reachable from the workers)
  --model-dir=DIR        HF checkpoint on the workers -> --config.model.checkpoint
  --model-gcs=gs://...   copy the checkpoint to --model-dir first
  --data-dir=DIR         train.parquet + test.parquet on the workers -> --config.data.train / .test
  --data-gcs=gs://...    copy them to --data-dir first
  --remote-dir=DIR       where the code goes on the workers (default ~/tspo_jax)
  --base-python=PY       Python >= 3.11 on the workers (default python3.11; apt-installed if missing)
  --log=FILE             training log on each worker (default ~/tspo_train.log)
  --skip-install         reuse the workers' venv as it is
  --skip-plan            do not run python -m tspo_jax.plan for the slice first (docs/POD_PLAN.md)
  --attach               stay attached to the training (default: detach and print how to follow it)
  --dry-run              print every command, run nothing
Flags after -- go to tspo_jax.train unchanged, e.g. -- --config.total_steps=200
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" SPOT=0
INDEX="" INDEX_GCS="" CORPUS="" PORT=8000 RETRIEVER_URL="" MODEL_DIR="" MODEL_GCS="" DATA_DIR="" DATA_GCS=""
REMOTE_DIR="~/tspo_jax" BASE_PYTHON=python3.11 LOG="~/tspo_train.log" SKIP_INSTALL=0 SKIP_PLAN=0 ATTACH=0 TRAIN_EXTRA=()
COORDINATOR_PORT=8476  # JAX's default coordinator port on Cloud TPU

while (($#)); do
  case ${1%%=*} in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) SPOT=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --skip-plan) SKIP_PLAN=1; shift ;;
    --attach) ATTACH=1; shift ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    --name | --zone | --accelerator | --config | --workdir | --project | --version | --index | --index-gcs | \
      --corpus | --port | --retriever-url | --model-dir | --model-gcs | --data-dir | --data-gcs | --remote-dir | \
      --base-python | --log)
      take_flag "$@"; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag ${1%%=*}; see --help" ;;
  esac
done

require "$NAME" --name "the TPU VM's name"
require "$ZONE" --zone "the TPU's zone, e.g. us-central2-b"
require "$ACCELERATOR" --accelerator "the slice type, e.g. v4-32 or v5litepod-64"
require "$CONFIG" --config "a config file and mesh, e.g. configs/qwen2_5_3b_tspo.py:tpu_v4_32"
require "$WORKDIR" --workdir "gs://BUCKET/PATH or a directory every worker shares, for checkpoints and metrics"
[[ -n $INDEX || -n $RETRIEVER_URL ]] || die "missing required flag --index (the index directory on the workers), or pass --retriever-url=URL of a running server; see --help"
[[ -f $REPO/${CONFIG%%:*} ]] || die "--config=$CONFIG: no file ${CONFIG%%:*} in $REPO (give it relative to the repository)"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port=$PORT must be a number"
[[ -z $MODEL_GCS || -n $MODEL_DIR ]] || die "--model-gcs needs --model-dir (where to put the checkpoint on the workers)"
[[ -z $DATA_GCS || -n $DATA_DIR ]] || die "--data-gcs needs --data-dir (where to put the data on the workers)"
[[ -z $INDEX_GCS || -n $INDEX ]] || die "--index-gcs needs --index (where to put the index on the workers)"
if [[ -z $VERSION ]]; then
  case $ACCELERATOR in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default TPU software version for --accelerator=$ACCELERATOR; pass --version=V" ;;
  esac
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
RDIR=$(quote_remote_path "$REMOTE_DIR")
RLOG=$(quote_remote_path "$LOG")
rpath() { quote_remote_path "$1"; }

# on_workers 'shell text': runs it on every worker of the slice at once.
on_workers() {
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

# 1. The TPU VM: reuse it when `describe` finds it, else create it.
create=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
((SPOT)) && create+=(--spot)
run_sh "$(quote "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)') || $(quote "${create[@]}")"

# 2. The code: this checkout's files (tracked and untracked, minus .gitignore'd), to every worker.
TARBALL=${TMPDIR:-/tmp}/tspo_jax_code_$NAME.tgz
run_sh "git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$REPO") --null --ignore-failed-read -T - -czf $(quote "$TARBALL")"
run "${TPU[@]}" scp "$TARBALL" "$NAME:tspo_jax_code.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
on_workers "mkdir -p $RDIR && tar -xzf tspo_jax_code.tgz -C $RDIR"

# 3. Install: requirements.txt, then the TPU build of the same jax version.
if ((!SKIP_INSTALL)); then
  JAX_VERSION=$(pinned_jax_version "$REPO")
  BP=$(quote "$BASE_PYTHON")
  on_workers "set -e; cd $RDIR; command -v $BP > /dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $BP $BP-venv; }; [ -x .venv/bin/python ] || $BP -m venv .venv; .venv/bin/python -m pip install -q -r requirements.txt; .venv/bin/python -m pip install -q $(quote "jax[tpu]==$JAX_VERSION") -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; .venv/bin/python -m pip install -q --no-deps -e ."
fi

# 3b. Does one training step fit this slice? tspo_jax.plan compiles it for the slice's topology
# (on the workers' CPUs: JAX_PLATFORMS=cpu leaves the chips alone) and exits non-zero, naming the
# function and the knobs, when it does not: the launch stops here instead of at the first step.
if ((!SKIP_PLAN)); then
  case $ACCELERATOR in
    v5litepod-*) TOPOLOGY=v5e-${ACCELERATOR#v5litepod-} ;;
    *) TOPOLOGY=$ACCELERATOR ;;
  esac
  plan=(.venv/bin/python -m tspo_jax.plan --config="$CONFIG" --topology="$TOPOLOGY")
  for a in "${TRAIN_EXTRA[@]}"; do [[ $a == --config.* ]] && plan+=("$a"); done  # the run's overrides
  on_workers "cd $RDIR && JAX_PLATFORMS=cpu $(quote "${plan[@]}")"
fi

# 4. Data, checkpoint and index from Cloud Storage onto every worker's disk.
for pair in "$MODEL_GCS|$MODEL_DIR" "$DATA_GCS|$DATA_DIR" "$INDEX_GCS|$INDEX"; do
  src=${pair%%|*} dst=${pair#*|}
  [[ -n $src ]] || continue
  on_workers "mkdir -p $(rpath "$dst") && gcloud storage rsync --recursive $(quote "$src") $(rpath "$dst")"
done

# 5. A retriever on every worker, on its CPU (a TPU's chips can be opened by one process only).
if [[ -z $RETRIEVER_URL ]]; then
  serve="bash launch/retriever_server.sh --index=$(rpath "$INDEX") --port=$PORT --python=.venv/bin/python --background"
  [[ -n $CORPUS ]] && serve+=" --corpus=$(rpath "$CORPUS")"
  on_workers "cd $RDIR && $serve"
  RETRIEVER_URL=http://127.0.0.1:$PORT
fi

# 6. Train on all workers together. jax.distributed starts when JAX_COORDINATOR_ADDRESS is set
# (tspo_jax.sharding); the process ids and count come from the TPU metadata.
capture WORKER0_IP "<worker-0-ip>" "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" \
  --format='value(networkEndpoints[0].ipAddress)'
train=(.venv/bin/python -m tspo_jax.train --config="$CONFIG")
train_cmd="$(quote "${train[@]}") --workdir=$(rpath "$WORKDIR") $(quote --config.retriever.spec="$RETRIEVER_URL")"
[[ -n $MODEL_DIR ]] && train_cmd+=" --config.model.checkpoint=$(rpath "$MODEL_DIR")"
[[ -n $DATA_DIR ]] && train_cmd+=" --config.data.train=$(rpath "$DATA_DIR/train.parquet") --config.data.test=$(rpath "$DATA_DIR/test.parquet")"
((${#TRAIN_EXTRA[@]})) && train_cmd+=" $(quote "${TRAIN_EXTRA[@]}")"
env_prefix="JAX_COORDINATOR_ADDRESS=$(quote "$WORKER0_IP:$COORDINATOR_PORT")"
if ((ATTACH)); then
  on_workers "cd $RDIR && $env_prefix $train_cmd 2>&1 | tee $RLOG"
else
  on_workers "cd $RDIR && $env_prefix nohup $train_cmd > $RLOG 2>&1 < /dev/null &"
  echo "# training detached on every worker; follow worker 0 with:"
  echo "#   $(quote "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 --command="tail -f $RLOG")"
fi
