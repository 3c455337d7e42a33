"""NVIDIA kvpress's KVzipPress on our documents and questions, as shipped.

Runs in its own environment (bench/.venv-kvpress, a pip --target folder holding kvpress
and the transformers it pins, put first on sys.path; see kvpress_env.py) as a script:

    python bench/quality/kvpress_peer.py JOB.json OUT.json

The job gives the model, a tokenizer folder, the tasks and the ratios. For every
(task, ratio) the context is prefilled once inside `with press(model)` (compression
happens before any question is seen: query-agnostic, like ours), timed as ingest; then
every question is answered greedily from that cache, exactly as kvpress's pipeline does.
Ratio r here is the KEPT fraction; kvpress's compression_ratio is 1 - r; ratio 1.0 runs
with no press. The prompt is ours: INSTRUCTION + document as the context, "\\n\\n" +
question as the question (kvpress wraps both in the model's chat template).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline


def _load(job: dict):  # type: ignore[no-untyped-def]
    kwargs = {"gguf_file": job["gguf_file"]} if job.get("gguf_file") else {}
    dtype = getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, **kwargs)
    model = model.to(job["device"]).eval()
    model.config.name_or_path = job["tokenizer_dir"]  # KVzipPress reloads its tokenizer here
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    probe = tokenizer.encode(job["probe_text"], add_special_tokens=False)
    if probe != job["probe_ids"]:
        raise SystemExit("the kvpress-side tokenizer encodes differently from ours")
    return model, tokenizer


def _answers(pipe, press, context: str, questions: list[str], max_new: int):  # type: ignore[no-untyped-def]
    """(ingest seconds, answers): kvpress pipeline's _forward, with the prefill timed."""
    inputs = pipe.preprocess(context, questions, answer_prefix="", max_context_length=10**9)
    device = pipe.model.device
    context_ids = inputs["context_ids"].to(device)
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode(), press(pipe.model) if press is not None else _null():
        pipe.model.model(input_ids=context_ids, past_key_values=cache)
    ingest_s = time.perf_counter() - t0
    answers = []
    with torch.inference_mode():
        for question_ids in inputs["questions_ids"]:
            lengths = [cache.get_seq_length(i) for i in range(len(cache))]
            answers.append(
                pipe.generate_answer(
                    question_ids=question_ids.to(device),
                    cache=cache,
                    context_length=context_ids.shape[1],
                    max_new_tokens=max_new,
                )
            )
            pipe._remove_answer_from_cache(cache, lengths)
    return ingest_s, answers, int(context_ids.shape[1])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(job_path: str, out_path: str) -> None:
    from kvpress import KVzipPress

    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model, tokenizer = _load(job)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    results = []
    for task in job["tasks"]:
        context = job["instruction"] + task["text"]
        questions = ["\n\n" + q["text"] for q in task["questions"]]
        for ratio in job["ratios"]:
            press = None if ratio >= 1.0 else KVzipPress(compression_ratio=1.0 - ratio)
            ingest_s, answers, tokens = _answers(
                pipe, press, context, questions, job["max_new"][task["kind"]]
            )
            results.append(
                {
                    "task": task["name"],
                    "ratio": ratio,
                    "ingest_s": ingest_s,
                    "prompt_tokens": tokens,
                    "answers": answers,
                }
            )
            sys.stderr.write(f"kvpress {task['name']!r} ratio {ratio}: {ingest_s:.1f}s\n")
            sys.stderr.flush()
        _write(out_path, results)  # after every task: a stopped peer leaves what it finished
    _write(out_path, results)


def _write(out_path: str, results: list[dict]) -> None:
    import os

    meta = {"transformers": transformers.__version__, "kvpress": _version("kvpress")}
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f)
    os.replace(out_path + ".tmp", out_path)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
