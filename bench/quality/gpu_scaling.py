"""How many launch-bound processes one GPU serves at once (sizes `--workers` of the grid).

Each process repeats a decode-step-shaped loop (30 blocks of small matmuls on one token
of a 576-wide model, like the default model's decode) for a few seconds; the aggregate
steps per second of N processes running together, against one alone:

    python -m bench.quality.gpu_scaling 1 4 12
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time


def _loop(seconds: float, start_at: float, out) -> None:  # type: ignore[no-untyped-def]
    import torch

    torch.set_num_threads(1)
    dev = torch.device("cuda")
    w1 = torch.randn(30, 576, 1536, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(30, 1536, 576, device=dev, dtype=torch.bfloat16) * 0.02
    x0 = torch.randn(1, 576, device=dev, dtype=torch.bfloat16)

    def step() -> None:
        x = x0
        for i in range(30):
            h = torch.nn.functional.layer_norm(x, (576,))
            x = x + torch.nn.functional.gelu(h @ w1[i]) @ w2[i]
        x.sum().item()

    for _ in range(5):
        step()
    while time.time() < start_at:
        time.sleep(0.001)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        step()
        n += 1
    out.put(n / (time.time() - t0))


def measure(n: int, seconds: float = 3.0) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 6.0  # after every process has its CUDA context
    procs = [ctx.Process(target=_loop, args=(seconds, start_at, q)) for _ in range(n)]
    for p in procs:
        p.start()
    rates = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    base = None
    for n in [int(a) for a in sys.argv[1:]] or [1, 4, 12]:
        rate = measure(n)
        base = base or rate
        print(f"processes {n:2d}: {rate:8.1f} steps/s together, {rate / base:.2f}x one", flush=True)


if __name__ == "__main__":
    main()
