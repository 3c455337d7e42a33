#!/usr/bin/env bash
# Copy this machine's redis-server and the shared libraries it links (not the C runtime: the
# device has its own glibc) into bench/.cache/redis, which bench/gpu/redis_local.py runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=bench/.cache/redis
mkdir -p "$CACHE/lib"
cp "$(command -v redis-server)" "$CACHE/redis-server"
ldd "$CACHE/redis-server" | awk '/=> \//{print $3}' \
  | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s)\.so' \
  | xargs -r -I{} cp -L {} "$CACHE/lib/"
du -sh "$CACHE"
