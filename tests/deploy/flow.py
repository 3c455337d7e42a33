"""register -> query -> delete through one API URL: the check that every deployment test runs
(tests/deploy/test_local_stack.py on local processes, `make compose-check` on containers).

    python -m tests.deploy.flow http://127.0.0.1:8000 [URL ...] [--api-key KEY]

Prints one JSON line (id, answer, timings) and exits 0, or raises on the first failure.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

PASS_KEY = "48213"


def document() -> str:
    lines = [f"Line {i}: the orchard keeps apples, pears and plums in rows." for i in range(40)]
    return "\n".join([*lines[:20], f"The pass key is {PASS_KEY}. Remember it.", *lines[20:]])


def wait_ready(client: httpx.Client, timeout_s: float) -> float:
    """Seconds until GET /readyz answers 200 (a worker beats and Redis answers)."""
    start = time.monotonic()
    while True:
        try:
            if client.get("/readyz", timeout=5.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{client.base_url}/readyz not 200 after {timeout_s:.0f} s")
        time.sleep(0.5)


def run(
    urls: str | Sequence[str],
    api_key: str | None = None,
    ready_timeout_s: float = 300.0,
    expect_pass_key: bool = False,
) -> dict[str, Any]:
    """Register a document, ask it a question, delete it; every answer checked (and, on a
    real model, `expect_pass_key`: the answer names the pass key). With several API URLs,
    the question goes to the last one: any API answers for a context any other registered."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with (
        httpx.Client(base_url=urls[0], headers=headers, timeout=300.0) as client,
        httpx.Client(base_url=urls[-1], headers=headers, timeout=300.0) as asker,
    ):
        ready_s = max(wait_ready(c, ready_timeout_s) for c in (client, asker))
        body = {"text": document(), "display_name": "deploy-check", "wait": True}
        t0 = time.monotonic()
        created = client.post("/contexts", json=body)
        ingest_s = time.monotonic() - t0
        assert created.status_code in (200, 201), created.text
        info = created.json()
        assert info["state"] == "READY", info
        context_id = info["id"]
        assert asker.get(f"/contexts/{context_id}").json()["state"] == "READY"

        question = {"question": "What is the pass key?", "max_new_tokens": 12}
        t0 = time.monotonic()
        answered = asker.post(f"/contexts/{context_id}/query", json=question)
        query_s = time.monotonic() - t0
        assert answered.status_code == 200, answered.text
        answer = answered.json()
        assert isinstance(answer["answer"], str), answer
        assert answer["usage"]["completion_tokens"] >= 1, answer
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, answer
        if expect_pass_key:
            assert PASS_KEY in answer["answer"], answer

        deleted = client.delete(f"/contexts/{context_id}")
        assert deleted.status_code == 204, deleted.text
        gone = asker.get(f"/contexts/{context_id}")
        assert gone.status_code == 404, gone.text
        return {
            "id": context_id,
            "context_tokens": info["usage"]["context_tokens"],
            "kept_fraction": info["compression"]["kept_fraction"],
            "stored_bytes": info["compression"].get("bytes"),
            "answer": answer["answer"],
            "ready_s": round(ready_s, 2),
            "ingest_s": round(ingest_s, 2),
            "query_s": round(query_s, 2),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--api-key")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument(
        "--expect-pass-key", action="store_true", help="the answer must name the pass key"
    )
    args = parser.parse_args()
    print(json.dumps(run(args.urls, args.api_key, args.ready_timeout, args.expect_pass_key)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
