#!/usr/bin/env bash
# Rebuild the git-ignored folders the H200 runs carry (a fresh checkout has none of them):
#   bench/.cache/tokenizer  the default model's tokenizer (the bench's token ids and prompts)
#   bench/.cache/whl        pure-Python wheels the H200 lacks (pytest, redis-py)
#   bench/.cache/redis      this machine's redis-server + the shared libraries it links
#   bench/.cache/kvpress    the kvpress peer's wheels: kvpress 0.5.5 + the transformers it pins
# Then: run(carry=["bench/.cache/tokenizer", "bench/.cache/whl", "bench/.cache/redis",
#                  "bench/.cache/kvpress"]) and
#   pip install --no-index --no-deps --target /tmp/site bench/.cache/whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 -m bench.gpu.run ...
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CACHE=bench/.cache
mkdir -p "$CACHE/whl" "$CACHE/redis/lib" "$CACHE/kvpress"
$PY - <<'PYEOF'
from service.config import EngineConfig
from service.engine.loading import load_tokenizer, resolve_source
load_tokenizer(resolve_source(EngineConfig())).save_pretrained("bench/.cache/tokenizer")
PYEOF
.venv/bin/pip download -q --no-deps -d "$CACHE/whl" pytest pluggy iniconfig packaging redis
# the pins of bench/quality/kvpress_env.py
$PY -c 'from bench.quality.kvpress_env import PINS; print("\n".join(PINS))' > "$CACHE/kvpress/pins.txt"
.venv/bin/pip download -q --no-deps -d "$CACHE/kvpress" -r "$CACHE/kvpress/pins.txt"
bash bench/gpu/carry_redis.sh
du -sh "$CACHE/tokenizer" "$CACHE/whl" "$CACHE/redis" "$CACHE/kvpress"
