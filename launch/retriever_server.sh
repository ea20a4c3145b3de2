#!/usr/bin/env bash
# Serves a passage index over Search-R1's HTTP API (POST /retrieve), building the index first if
# it is missing. Runs in the foreground unless --background.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/retriever_server.sh --index=DIR [flags]

  --index=DIR           index directory (required); built from --corpus when it has no manifest.json
  --corpus=FILE         corpus JSONL, one {"id", "contents": "Title\ntext"} per line (to build the index)
  --encoder=DIR         HF BERT-family encoder for the build (default: the packaged all-MiniLM-L6-v2)
  --query-prefix=S      e5 encoders: "query: "   (stored in the index manifest)
  --passage-prefix=S    e5 encoders: "passage: "
  --mode=M              auto | scann | exact (default auto)
  --host=H              default 127.0.0.1; 0.0.0.0 serves other machines too
  --port=P              default 8000
  --topk=K              documents per query when a request names none (default 3)
  --batch-size=N        queries per encoder batch (default 64)
  --platform=P          cpu (default: the accelerators stay free for the trainer; on a TPU only one
                        process may open the chips) or any (JAX picks)
  --python=PY           interpreter with tspo_jax installed (default: $PYTHON or python)
  --background          start detached, wait until GET /health answers, then return
  --log=FILE            server log in --background mode (default $TMPDIR or /tmp: tspo_retriever_PORT.log)
  --pid-file=FILE       default $TMPDIR or /tmp: tspo_retriever_PORT.pid
  --wait=SECONDS        how long --background waits for /health (default 1800: a 21M-passage
                        index takes minutes to load)
  --dry-run             print every command, run nothing
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INDEX="" CORPUS="" ENCODER="" QUERY_PREFIX="" PASSAGE_PREFIX="" MODE=auto
HOST=127.0.0.1 PORT=8000 TOPK=3 BATCH_SIZE=64 PLATFORM=cpu PYTHON=${PYTHON:-python}
BACKGROUND=0 LOG="" PID_FILE="" WAIT=1800

while (($#)); do
  case ${1%%=*} in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --background) BACKGROUND=1; shift ;;
    --index | --corpus | --encoder | --query-prefix | --passage-prefix | --mode | --host | --port | --topk | \
      --batch-size | --platform | --python | --log | --pid-file | --wait)
      take_flag "$@"; shift "$FLAG_SHIFT" ;;
    *) die "unknown flag ${1%%=*}; see --help" ;;
  esac
done

require "$INDEX" --index "the index directory to serve"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port=$PORT must be a number"
[[ $WAIT =~ ^[0-9]+$ ]] || die "--wait=$WAIT must be a number of seconds"
case $PLATFORM in
  cpu) ENV=(env JAX_PLATFORMS=cpu) ;;
  any) ENV=(env) ;;
  *) die "--platform=$PLATFORM: choose cpu or any" ;;
esac
LOG=${LOG:-${TMPDIR:-/tmp}/tspo_retriever_$PORT.log}
PID_FILE=${PID_FILE:-${TMPDIR:-/tmp}/tspo_retriever_$PORT.pid}
PROBE_HOST=$HOST
[[ $HOST == 0.0.0.0 ]] && PROBE_HOST=127.0.0.1
HEALTH_URL="http://$PROBE_HOST:$PORT/health"
PROBE=("$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5).read()' "$HEALTH_URL")

# 1. The index: an index directory is finished when its manifest.json exists (written last).
if [[ -f $INDEX/manifest.json ]]; then
  echo "# index found: $INDEX"
elif [[ -n $CORPUS ]]; then
  build=("${ENV[@]}" "$PYTHON" -m tspo_jax.retrieval.build_index --corpus="$CORPUS" --out="$INDEX" --mode="$MODE"
    --batch_size="$BATCH_SIZE" --overwrite)
  [[ -n $ENCODER ]] && build+=(--encoder="$ENCODER")
  [[ -n $QUERY_PREFIX ]] && build+=(--query_prefix="$QUERY_PREFIX")
  [[ -n $PASSAGE_PREFIX ]] && build+=(--passage_prefix="$PASSAGE_PREFIX")
  run "${build[@]}"
else
  die "$INDEX holds no finished index (no manifest.json): pass --corpus=FILE to build it there"
fi

# 2. The server.
serve=("${ENV[@]}" "$PYTHON" -m tspo_jax.retrieval.server --index="$INDEX" --host="$HOST" --port="$PORT"
  --topk="$TOPK" --batch_size="$BATCH_SIZE")
if ((!BACKGROUND)); then
  run "${serve[@]}"
  exit 0
fi

if ((!DRY_RUN)) && "${PROBE[@]}" 2>/dev/null; then
  echo "# a retriever already answers on $HEALTH_URL: reusing it"
  exit 0
fi
run_sh "nohup $(quote "${serve[@]}") > $(quote "$LOG") 2>&1 < /dev/null & echo \$! > $(quote "$PID_FILE")"
echo "# until it answers (at most ${WAIT}s):"
echo "+ $(quote "${PROBE[@]}")"
if ((DRY_RUN)); then exit 0; fi
deadline=$((SECONDS + WAIT))
until "${PROBE[@]}" 2>/dev/null; do
  pid=$(cat "$PID_FILE")
  if ! kill -0 "$pid" 2>/dev/null; then
    tail -n 20 "$LOG" >&2 || true
    die "the retriever exited before answering on $HEALTH_URL; its log is $LOG"
  fi
  ((SECONDS < deadline)) || die "no answer on $HEALTH_URL after ${WAIT}s; the server (pid $pid) logs to $LOG"
  sleep 2
done
echo "# retriever up on http://$PROBE_HOST:$PORT (pid $(cat "$PID_FILE"), log $LOG); stop it with: kill \$(cat $(quote "$PID_FILE"))"
