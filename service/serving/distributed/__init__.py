"""Distributed mode: API processes without a model, workers with one, joined by Redis.

    API process (no torch)          Redis                         worker (one per GPU)
    remote.RemoteContextService ─XADD─► {p}jobs:ingest|query ─XREADGROUP─► worker.StreamWorker
      records, progress         ◄────── {p}ctx:<id>       ◄─ READY/FAILED ─ executor.EngineExecutor
      answers, token by token   ◄XREAD─ {p}reply:<request> ◄──── XADD ────   (engine + tiers)
      readiness                 ◄────── {p}worker:<name>  (heartbeat, a key with a TTL)

Modules: `keys` (every key name), `jobs` (what the streams carry), `transport` (the consumer
group: own pending first, XAUTOCLAIM, dead letters), `records` (context records in Redis),
`heartbeat` (live workers), `affinity` (queries to the worker holding their context),
`remote` (the facade for app/, torch-free), `worker` (the job loop, torch-free), `executor`
(runs jobs on the engine), `worker_main` (`run_worker`).
Importing this package imports nothing heavy.
"""
