"""The grid spread over several worker processes on one device (`--workers N`).

The default model (135M parameters) is launch-bound on a GPU: one process keeps the H200
mostly idle, so N processes, each with its own engine on the same device, answer N times
as many questions in parallel (up to what the GPU and the CPU cores give). Work units are
documents, a QA document split into parts of a few questions each (every part compresses
the same document the same way, so its rows are those of the unsplit document).

Every worker runs its units twice: first every method except kvzap (which needs
predictors fitted by the parent, meanwhile), then, once the parent signals that the
predictors are stored, the kvzap methods. After every unit it rewrites its results file,
so a deadline that stops the workers still leaves every finished unit.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from bench.quality.data import Task


def split_questions(tasks: list[Task], per_unit: int) -> list[Task]:
    """QA tasks cut into parts of at most `per_unit` questions (needles stay whole)."""
    if per_unit <= 0:
        return list(tasks)
    out: list[Task] = []
    for t in tasks:
        if t.kind != "qa" or len(t.questions) <= per_unit:
            out.append(t)
            continue
        for k in range(0, len(t.questions), per_unit):
            part = t.questions[k : k + per_unit]
            out.append(replace(t, name=f"{t.name} [q{k + 1}-{k + len(part)}]", questions=part))
    return out


def base_name(name: str) -> str:
    """The document a unit belongs to ("Title [q1-4]" -> "Title")."""
    return name.split(" [q", 1)[0]


def cost(task: Task) -> float:
    """Rough work of a unit: answer tokens of all its questions plus per-method setup."""
    answer = 17.0 if task.kind == "qa" else 13.0
    return len(task.questions) * answer + 10.0 + len(task.text) / 2000.0


def shards(tasks: list[Task], n: int) -> list[list[Task]]:
    """Longest-processing-time-first assignment of units to `n` workers."""
    loads = [0.0] * n
    out: list[list[Task]] = [[] for _ in range(n)]
    for t in sorted(tasks, key=cost, reverse=True):
        i = min(range(n), key=loads.__getitem__)
        out[i].append(t)
        loads[i] += cost(t)
    return [s for s in out if s]


def _dump(path: Path, grid, done: dict[str, list[str]]) -> None:  # type: ignore[no-untyped-def]
    data = grid.to_json() | {"done": done}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def worker(job: dict, tasks: list[Task], out_path: str) -> None:
    """One worker process: load the engine, run its units (see the module docstring)."""
    import torch

    from bench.quality import kvzap
    from bench.quality.runner import Grid, _log
    from service.engine.kvzip_engine import KVzipEngine

    torch.set_num_threads(job["threads"] or 1)
    engine = KVzipEngine.load(job["engine_config"])  # paths included (head scores, kvzap)
    path = Path(out_path)
    plain = [m for m in job["methods"] if not kvzap.is_kvzap(m)]
    learned = [m for m in job["methods"] if kvzap.is_kvzap(m)]
    grid = Grid(engine, plain, job["ratios"], job["max_new"])
    done: dict[str, list[str]] = {"plain": [], "kvzap": []}
    for task in tasks:
        grid.run_task(task)
        done["plain"].append(task.name)
        _dump(path, grid, done)
    if not learned:
        return
    ready, failed = Path(job["ready_flag"]), Path(job["ready_flag"] + ".failed")
    while not ready.exists():
        if failed.exists():
            _log("worker: kvzap calibration failed, no kvzap rows")
            return
        time.sleep(0.5)
    grid.methods, grid.full_rows = learned, False
    for task in tasks:
        grid.run_task(task)
        done["kvzap"].append(task.name)
        _dump(path, grid, done)


class Pool:
    """The worker processes of one grid (spawned: CUDA cannot be forked)."""

    def __init__(self, job: dict, units: list[Task], n: int, folder: Path) -> None:
        import multiprocessing as mp

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ready_flag = folder / "kvzap-ready"
        for stale in (self.ready_flag, Path(str(self.ready_flag) + ".failed")):
            stale.unlink(missing_ok=True)
        job = dict(job, ready_flag=str(self.ready_flag))
        ctx = mp.get_context("spawn")
        self.paths = []
        self.procs = []
        for i, shard in enumerate(shards(units, n)):
            path = folder / f"worker-{i}.json"
            path.unlink(missing_ok=True)
            proc = ctx.Process(target=worker, args=(job, shard, str(path)), daemon=True)
            proc.start()
            self.paths.append(path)
            self.procs.append(proc)

    def signal(self, ok: bool) -> None:
        """Tell the workers that the kvzap predictors are stored (or will never be)."""
        (self.ready_flag if ok else Path(str(self.ready_flag) + ".failed")).touch()

    def wait(self, deadline: float | None) -> bool:
        """Wait for every worker until `deadline` (time.time()); stop the rest. True when
        every worker finished on its own."""
        for proc in self.procs:
            left = None if deadline is None else max(0.0, deadline - time.time())
            proc.join(left)
        finished = True
        for proc in self.procs:
            if proc.is_alive():
                finished = False
                proc.terminate()
                proc.join(10)
        return finished

    def results(self) -> dict:
        """Rows and timings of every finished unit; `done`: unit names per pass."""
        rows: list[dict] = []
        timings: list[dict] = []
        done: dict[str, list[str]] = {"plain": [], "kvzap": []}
        for path in self.paths:
            if not path.exists():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            rows += data["rows"]
            timings += data["timings"]
            for key in done:
                done[key] += data["done"].get(key, [])
        return {"rows": rows, "timings": timings, "done": done}
