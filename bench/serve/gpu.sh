#!/usr/bin/env bash
# One lent-GPU call of the serving benchmark through HTTP. Prepare here first:
#   bash bench/serve/prepare_carry.sh      # bench/.cache/{tokenizer,serve-whl}
# then run(carry=["bench/.cache/tokenizer", "bench/.cache/serve-whl"],
#          command="bash bench/serve/gpu.sh [extra bench.serve.run flags]")
# Results under $OUT (serve-cuda.json, the log); render the plot here afterwards with
#   python -m bench.serve.report bench/results/serve-cuda.json
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/.cache/serve-whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [[ "${PROFILE:-0}" == 1 ]]; then  # the engine-level step first (bench/serve/profile_rows.py)
  timeout 200 python3 -m bench.serve.profile_rows --out "$OUT/serve-profile.json" 2>&1 \
    | grep -v -i warn | tail -8
fi
timeout "${LIMIT:-560}" python3 -m bench.serve.run --random-8b --device cuda \
  --out-dir "$OUT" "$@" > "$OUT/serve.log" 2>&1
echo "rc=$?"; grep -v -i warn "$OUT/serve.log" | tail -40
