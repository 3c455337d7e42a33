"""The HTTP API under a real uvicorn server over the tiny model: a real streamed answer,
cancellation when the client goes away, the official `openai` client, and the `kvzip` CLI."""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import main as kvzip
from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from tests.app.conftest import serving

KEY_A, KEY_B = "sk-team-a-key-0001", "sk-team-b-key-0002"
TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8


@pytest.fixture(scope="module")
def live(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from service.serving.embedded import build_embedded_service

    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                patch.delenv(name)
        settings = Settings(
            api_keys={KEY_A: "team-a", KEY_B: "team-b"},
            chunk_size=64,
            data_dir=tmp_path_factory.mktemp("live"),
        )
    service = build_embedded_service(settings.to_service_config(), engine=tiny_engine)
    with serving(create_app(settings, service)) as url:
        yield {"url": url, "service": service}


def client(live: dict[str, Any], key: str = KEY_A) -> httpx.Client:
    return httpx.Client(base_url=live["url"], headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def context_id(live: dict[str, Any]) -> str:
    with client(live) as http:
        response = http.post("/contexts", json={"text": TEXT, "display_name": "museum"})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def sse_payloads(response: httpx.Response) -> list[Any]:
    return [
        line[6:] if line == "data: [DONE]" else json.loads(line[6:])
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


# --- a real streamed answer, and cancellation ----------------------------------------------------


def test_a_streamed_answer_parses_and_matches_the_plain_one(
    live: dict[str, Any], context_id: str
) -> None:
    question = {"question": "When does the museum open?", "max_new_tokens": 12}
    with client(live) as http:
        plain = http.post(f"/contexts/{context_id}/query", json=question).json()
        with http.stream(
            "POST", f"/contexts/{context_id}/query", json={**question, "stream": True}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-request-id"]
            events = sse_payloads(response)

    assert events[-1] == "[DONE]"
    final = events[-2]
    deltas = [event["delta"] for event in events[:-2]]
    assert deltas and all(deltas)
    assert "".join(deltas) == final["answer"] == plain["answer"]
    assert final["usage"] == plain["usage"]
    assert final["usage"]["prompt_tokens_details"]["cached_tokens"] > 100
    assert set(final["timings"]) == {"load_s", "ttft_s", "decode_s"}


def test_closing_the_connection_cancels_the_generation(
    live: dict[str, Any], context_id: str
) -> None:
    from service import telemetry

    service = live["service"]
    cancelled = telemetry.QUERIES_CANCELLED._value.get()
    generated = telemetry.GENERATED_TOKENS._value.get()
    body = {"question": "Tell me everything.", "max_new_tokens": 1000, "stream": True}
    with (
        client(live) as http,
        http.stream("POST", f"/contexts/{context_id}/query", json=body) as response,
    ):
        assert response.status_code == 200
        received: list[str] = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(line)
            if len(received) == 3:
                break
    deadline = time.monotonic() + 20
    while telemetry.QUERIES_CANCELLED._value.get() == cancelled or service.worker.queued:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.02)
    stopped_at = telemetry.GENERATED_TOKENS._value.get()
    time.sleep(0.3)

    assert len(received) == 3
    assert telemetry.GENERATED_TOKENS._value.get() == stopped_at  # nothing more is generated
    assert stopped_at - generated < 100


# --- tenants and limits on the real service ------------------------------------------------------


def test_tenants_do_not_share_contexts(live: dict[str, Any], context_id: str) -> None:
    with client(live, KEY_B) as http:
        assert http.get(f"/contexts/{context_id}").status_code == 404
        mine = http.post("/contexts", json={"text": TEXT})

    assert mine.status_code == 201  # the same text is a new context for another tenant
    assert mine.json()["id"] != context_id


def test_a_document_over_the_window_is_413_with_counts(live: dict[str, Any]) -> None:
    with client(live) as http:
        response = http.post("/contexts", json={"text": "word " * 5000})

    assert response.status_code == 413
    message = response.json()["error"]["message"]
    assert "document is" in message and "at most 3712 context tokens" in message


# --- the official openai client ------------------------------------------------------------------


def test_openai_client_chat_completion(live: dict[str, Any], context_id: str) -> None:
    import openai

    api = openai.OpenAI(base_url=live["url"] + "/v1", api_key=KEY_A, max_retries=0)
    model = api.models.list().data[0].id
    question = "When does the museum open?"
    with client(live) as http:
        native = http.post(
            f"/contexts/{context_id}/query", json={"question": question, "max_new_tokens": 10}
        ).json()

    completion = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=10,
        extra_body={"context_id": context_id},
    )

    assert model == live["service"].model_name
    assert completion.object == "chat.completion" and completion.model == model
    assert completion.choices[0].message.content == native["answer"]
    assert completion.choices[0].finish_reason == native["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    details = completion.usage.prompt_tokens_details
    assert details is not None
    assert details.cached_tokens == native["usage"]["prompt_tokens_details"]["cached_tokens"]

    chunks = list(
        api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"context_id": context_id},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == native["answer"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == completion.choices[
        0
    ].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


CONVERSATION: list[Any] = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "When does the museum open?"},
    {"role": "assistant", "content": "At nine."},
    {"role": "user", "content": "How much are tickets?"},
]


def test_openai_client_conversation_is_the_prompt_the_engine_gets(
    live: dict[str, Any], context_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A system message and two turns: the engine decodes from the chat-templated
    conversation after the cached context, and the context (cached tokens) is the same."""
    import openai

    service = live["service"]
    scheduler = service.pipeline.scheduler
    prompts: list[list[int]] = []
    generate = scheduler.generate

    def recording(ctx: Any, prompt: list[int], sampling: Any) -> Any:
        prompts.append(list(prompt))
        return generate(ctx, prompt, sampling)

    monkeypatch.setattr(scheduler, "generate", recording)
    api = openai.OpenAI(base_url=live["url"] + "/v1", api_key=KEY_A, max_retries=0)
    with client(live) as http:
        native = http.post(
            f"/contexts/{context_id}/query", json={"question": "Hi?", "max_new_tokens": 2}
        ).json()

    completion = api.chat.completions.create(
        model=service.model_name,
        messages=CONVERSATION,
        max_tokens=4,
        extra_body={"context_id": context_id},
    )

    assert len(prompts) == 2
    text = service.pipeline.engine.tokenizer.decode(prompts[-1])
    assert text == (
        "\n\nAnswer in one word.\n\nWhen does the museum open?<|im_end|>\n"
        "<|im_start|>assistant\nAt nine.<|im_end|>\n<|im_start|>user\n"
        "How much are tickets?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    cached = native["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert completion.usage.prompt_tokens_details.cached_tokens == cached
    assert completion.usage.prompt_tokens == cached + len(prompts[-1])


def test_openai_client_a_conversation_over_the_window_is_413_with_both_counts(
    live: dict[str, Any], context_id: str
) -> None:
    import openai

    api = openai.OpenAI(base_url=live["url"] + "/v1", api_key=KEY_A, max_retries=0)
    long_turn = {"role": "assistant", "content": "word " * 5000}
    messages: list[Any] = [*CONVERSATION[:3], long_turn, CONVERSATION[3]]

    with pytest.raises(openai.APIStatusError) as refused:
        api.chat.completions.create(
            model=live["service"].model_name,
            messages=messages,
            max_tokens=16,
            extra_body={"context_id": context_id},
        )

    assert refused.value.status_code == 413
    message = str(refused.value.body)
    needed, budget = (int(n) for n in re.findall(r"(\d+) tokens; .*room for (\d+)", message)[0])
    assert needed > 5000 > budget > 3000  # the 4096-token window minus the context and 16


def test_openai_client_unsupported_fields_are_400(live: dict[str, Any], context_id: str) -> None:
    import openai

    api = openai.OpenAI(base_url=live["url"] + "/v1", api_key=KEY_A, max_retries=0)
    asks: dict[str, Any] = {"n": 2, "logprobs": True, "presence_penalty": 0.5}
    for field, value in asks.items():
        with pytest.raises(openai.BadRequestError, match=f"'{field}'"):
            api.chat.completions.create(
                model=live["service"].model_name,
                messages=[{"role": "user", "content": "Hi?"}],
                extra_body={"context_id": context_id},
                **{field: value},
            )


def test_openai_client_errors(live: dict[str, Any], context_id: str) -> None:
    import openai

    api = openai.OpenAI(base_url=live["url"] + "/v1", api_key=KEY_A, max_retries=0)
    model = api.models.list().data[0].id
    message = [{"role": "user", "content": "Hi?"}]

    with pytest.raises(openai.NotFoundError, match="not found"):
        api.chat.completions.create(
            model=model, messages=message, extra_body={"context_id": "ctx_" + "0" * 32}
        )
    with pytest.raises(openai.NotFoundError, match="not served here"):
        api.chat.completions.create(
            model="gpt-4o", messages=message, extra_body={"context_id": context_id}
        )
    with pytest.raises(openai.UnprocessableEntityError, match="context_id"):
        api.chat.completions.create(model=model, messages=message)
    with pytest.raises(openai.BadRequestError, match="user message"):
        api.chat.completions.create(
            model=model,
            messages=[{"role": "assistant", "content": "x"}],
            extra_body={"context_id": context_id},
        )
    wrong_key = openai.OpenAI(base_url=live["url"] + "/v1", api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


# --- the kvzip command line ----------------------------------------------------------------------


def run_cli(live: dict[str, Any], *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = kvzip([*args, "--url", live["url"], "--api-key", KEY_A], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_cli_ingest_ls_ask_rm(live: dict[str, Any], tmp_path: Path) -> None:
    document = tmp_path / "report.txt"
    document.write_text(TEXT + " The gift shop sells maps.", encoding="utf-8")

    status, out, err = run_cli(live, "ingest", str(document), "--ratio", "0.5", "--poll", "0.01")
    assert status == 0, err
    new_id = out.strip()
    assert new_id.startswith("ctx_") and "scoring" in err and "kept 0.50" in err

    status, out, _ = run_cli(live, "ls", "--page-size", "1")
    assert status == 0
    assert new_id in out and "report.txt" in out and out.startswith("ID")

    status, out, err = run_cli(
        live, "ask", new_id, "Where are maps sold?", "--max-new-tokens", "8", "-v"
    )
    with client(live) as http:
        expected = http.post(
            f"/contexts/{new_id}/query",
            json={"question": "Where are maps sold?", "max_new_tokens": 8},
        ).json()
    assert status == 0, err
    assert out == expected["answer"] + "\n"
    completion = expected["usage"]["completion_tokens"]
    assert f"[{completion} tokens, cached " in err and "first token after" in err

    status, out, _ = run_cli(live, "rm", new_id)
    assert (status, out) == (0, f"deleted {new_id}\n")
    status, _, err = run_cli(live, "rm", new_id)
    assert status == 1 and "404" in err and "not found" in err


def test_cli_reports_refusals_and_unreachable_servers(live: dict[str, Any]) -> None:
    status, _, err = run_cli(live, "ask", "ctx_" + "0" * 32, "Q?")
    assert status == 1 and "not found" in err

    out, err_io = io.StringIO(), io.StringIO()
    status = kvzip(["ls", "--url", "http://127.0.0.1:9"], out=out, err=err_io)
    assert status == 2 and "cannot reach the server" in err_io.getvalue()

    status = kvzip(["--url", live["url"], "ls"], out=io.StringIO(), err=err_io)
    assert status == 1 and "an API key is required" in err_io.getvalue()


# --- engine-side metrics and health of the real service ------------------------------------------


def test_metrics_cover_ingest_compression_queue_and_tiers(
    live: dict[str, Any], context_id: str
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with client(live) as http:
        http.post(f"/contexts/{context_id}/query", json={"question": "Hi?", "max_new_tokens": 2})
        text = httpx.get(live["url"] + "/metrics").text
        ready = httpx.get(live["url"] + "/readyz")

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert ready.status_code == 200
    for phase in ("prefill", "scoring", "selection", "store"):
        assert value("kvzip_ingest_phase_seconds_count", phase=phase) >= 1, phase
    assert value("kvzip_compression_kept_ratio_count") >= 1
    assert value("kvzip_context_tokens_count") >= 1
    assert value("kvzip_ingests_total", outcome="ready") >= 1
    assert value("kvzip_request_queue_time_seconds_count") >= 2
    assert value("kvzip_time_to_first_token_seconds_count") >= 1
    assert value("kvzip_generation_tokens_total") >= 2
    assert value("kvzip_tier_bytes", tier="disk") > 0
    assert value("kvzip_tier_bytes", tier="resident") > 0
    assert value("kvzip_tier_hits_total", tier="resident") >= 1
    assert ("kvzip_tier_misses_total", (("tier", "memory"),)) in samples
    assert ("kvzip_tier_evictions_total", (("tier", "disk"),)) in samples
    assert ("kvzip_queue_depth", ()) in samples
    assert "ctx_" not in text


def test_cli_worker_without_the_distributed_package_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    real = importlib.import_module

    def missing(name: str, *args: Any) -> Any:
        if name == "service.serving.distributed.worker_main":
            raise ModuleNotFoundError("No module named 'torch'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    err = io.StringIO()

    status = kvzip(["worker"], out=io.StringIO(), err=err)

    assert status == 2
    assert "the distributed worker is not available here" in err.getvalue()
    assert "No module named 'torch'" in err.getvalue()
