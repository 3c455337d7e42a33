#!/usr/bin/env bash
# The git-ignored folders a GPU serving run carries (bench/serve/gpu.sh):
#   bench/.cache/tokenizer   the default model's tokenizer (the 8B-shaped model's prompts)
#   bench/.cache/serve-whl   the app's wheels the GPU machine lacks, for its Python 3.12
#   bench/.cache/redis       a redis-server for bench/serve/ttft.py's Redis tier
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p bench/.cache/serve-whl
.venv/bin/python - <<'PYEOF'
from service.config import EngineConfig
from service.engine.loading import load_tokenizer, resolve_source
load_tokenizer(resolve_source(EngineConfig())).save_pretrained("bench/.cache/tokenizer")
PYEOF
.venv/bin/pip download -q --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  --no-deps -d bench/.cache/serve-whl fastapi starlette uvicorn h11 click httpx httpcore anyio \
  idna certifi pydantic pydantic-core pydantic-settings python-dotenv typing-extensions \
  typing-inspection annotated-types annotated-doc opentelemetry-api prometheus-client redis hiredis
du -sh bench/.cache/tokenizer bench/.cache/serve-whl
bash bench/gpu/carry_redis.sh
