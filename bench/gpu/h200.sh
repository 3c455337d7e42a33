#!/usr/bin/env bash
# One lent-H200 call of the GPU checks and benchmark (run locally first:
# `bash bench/gpu/prepare_carry.sh`; carry bench/.cache/tokenizer, bench/.cache/whl and
# bench/.cache/redis; bench/.cache/kvpress for the peer). Every step has its own time limit and writes under $OUT, so a call
# cut short still returns what finished. Usage on the device:
#   bash bench/gpu/h200.sh tests                 # the GPU test suite (~2 min)
#   bash bench/gpu/h200.sh bench cuda 8192 32768 # bench rows with one backend
#   bash bench/gpu/h200.sh bench cudnn 131072 --no-compiled
#   bash bench/gpu/h200.sh kvpress 8192 32768    # the kvpress KVzipPress peer
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/.cache/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export KVZIP_TEST_TOKENIZER_DIR=$PWD/bench/.cache/tokenizer
case "${1:-}" in
  tests)
    timeout "${LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
      tests/service/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -30 ;;
  bench)
    backend=$2; shift 2
    lengths=(); while [[ $# -gt 0 && $1 != --* ]]; do lengths+=("$1"); shift; done
    timeout "${LIMIT:-540}" python3 -m bench.gpu.run --backend "$backend" \
      --lengths "${lengths[@]}" --out "$OUT/gpu-$backend.json" "$@" > "$OUT/bench-$backend.log" 2>&1
    echo "rc=$?"; grep -v -E '^(W1|  )' "$OUT/bench-$backend.log" | grep -v -i warn | tail -40 ;;
  kvpress)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvp \
      bench/.cache/kvpress/*.whl
    PYTHONPATH=/tmp/kvp:$PWD/bench/quality/kvpress_stubs:$PWD timeout "${LIMIT:-400}" \
      python3 -m bench.gpu.kvpress_ingest --lengths "$@" --out "$OUT/gpu-kvpress.json" \
      > "$OUT/kvpress.log" 2>&1
    echo "rc=$?"; grep -v -i warn "$OUT/kvpress.log" | tail -20 ;;
  *) echo "usage: $0 tests | bench BACKEND LENGTH... [flags] | kvpress LENGTH..."; exit 2 ;;
esac
