"""`kvzip`: the command line. It talks to a running server over HTTP (httpx), never torch.

    kvzip serve [--host H] [--port P]       run the HTTP service (KVZIP_* settings)
    kvzip worker                            run a distributed-mode worker (KVZIP_* settings)
    kvzip ingest FILE [--ratio R] ...       register a document, with a progress bar
    kvzip ask ID QUESTION [...]             stream an answer to stdout
    kvzip ls [--all]                        list contexts
    kvzip rm ID [ID ...]                    delete contexts
    kvzip calibrate ...                     head scores for method kvzip_head (loads the model)
    kvzip calibrate-scorer ...              the predictor of method kvzap (loads the model)

Client commands take `--url` (or KVZIP_URL, default http://127.0.0.1:8000) and `--api-key`
(or KVZIP_API_KEY). Exit status: 0 done, 1 the server refused (its message on stderr),
2 the server could not be reached or the command is unavailable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx
from tqdm import tqdm

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["build_parser", "main"]

DEFAULT_URL = "http://127.0.0.1:8000"


class CommandError(Exception):
    """A failure to report on stderr with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- HTTP -------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> httpx.Client:
    url = args.url or os.environ.get("KVZIP_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("KVZIP_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(60.0, read=None))


def _checked(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx response, else CommandError with the server's message."""
    if response.is_success:
        body: dict[str, Any] = response.json() if response.content else {}
        return body
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text or response.reason_phrase
    raise CommandError(f"{response.status_code}: {message}")


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a Server-Sent Events body, until `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


# --- client commands --------------------------------------------------------------------------


def _ingest(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    body: dict[str, Any] = {"text": text, "wait": False}
    if args.display_name or args.file != "-":
        body["display_name"] = args.display_name or Path(args.file).name
    compression = {k: v for k, v in (("method", args.method), ("ratio", args.ratio)) if v}
    if compression:
        body["compression"] = compression
    if args.system:
        body["system"] = args.system
    if args.ttl:
        body["ttl_seconds"] = args.ttl
    with _client(args) as client:
        info = _checked(client.post("/contexts", json=body))
        if info["state"] == "PROCESSING":
            info = _follow(client, info, args.poll, err, quiet=args.quiet)
    if info["state"] == "FAILED":
        raise CommandError(f"ingest of {info['id']} failed: {info.get('error')}")
    compression_out = info["compression"]
    err.write(
        f"{info['id']}: {info['usage']['context_tokens']} tokens, kept "
        f"{compression_out['kept_fraction']:.3f} of the KV pairs ({compression_out['bytes']} "
        f"bytes), expires {info.get('expire_time')}\n"
    )
    out.write(info["id"] + "\n")
    return 0


def _follow(
    client: httpx.Client, info: dict[str, Any], poll: float, err: TextIO, quiet: bool
) -> dict[str, Any]:
    """Poll GET until the context leaves PROCESSING, drawing `progress` as a bar."""
    with tqdm(
        total=100, unit="%", desc="scoring", file=err, disable=quiet, bar_format="{l_bar}{bar}|"
    ) as bar:
        while info["state"] == "PROCESSING":
            bar.update(max(0, round(100 * info.get("progress", 0.0)) - bar.n))
            time.sleep(poll)
            info = _checked(client.get(f"/contexts/{info['id']}"))
        bar.update(100 - bar.n if info["state"] == "READY" else 0)
    return info


def _ask(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    body: dict[str, Any] = {
        "question": args.question,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "stream": True,
    }
    optional = (("top_p", args.top_p), ("seed", args.seed), ("stop", args.stop))
    body.update({name: value for name, value in optional if value is not None})
    with (
        _client(args) as client,
        client.stream("POST", f"/contexts/{args.context_id}/query", json=body) as response,
    ):
        if not response.is_success:
            _checked(response)
        for payload in _events(response):
            if "error" in payload:
                raise CommandError(payload["error"]["message"])
            if "delta" in payload:
                out.write(payload["delta"])
                out.flush()
            elif "usage" in payload and args.verbose:
                usage, timings = payload["usage"], payload["timings"]
                err.write(
                    f"\n[{usage['completion_tokens']} tokens, cached "
                    f"{usage['prompt_tokens_details']['cached_tokens']}, first token after "
                    f"{timings['ttft_s']:.3f} s, {payload['finish_reason']}]"
                )
    out.write("\n")
    return 0


def _ls(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rows = [("ID", "STATE", "TOKENS", "KEPT", "EXPIRES", "NAME")]
    token: str | None = None
    with _client(args) as client:
        while True:
            params: dict[str, Any] = {"page_size": args.page_size}
            if token:
                params["page_token"] = token
            page = _checked(client.get("/contexts", params=params))
            for info in page["contexts"]:
                rows.append(
                    (
                        info["id"],
                        info["state"]
                        + ("" if info["state"] != "PROCESSING" else f" {info['progress']:.0%}"),
                        str(info["usage"]["context_tokens"]),
                        f"{info['compression']['kept_fraction']:.3f}",
                        str(info.get("expire_time") or "-"),
                        info.get("display_name") or "",
                    )
                )
            token = page.get("next_page_token")
            if not token:
                break
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    return 0


def _rm(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status = 0
    with _client(args) as client:
        for context_id in args.context_ids:
            try:
                _checked(client.delete(f"/contexts/{context_id}"))
                out.write(f"deleted {context_id}\n")
            except CommandError as exc:
                err.write(f"kvzip: {context_id}: {exc}\n")
                status = 1
    return status


# --- server-side commands ---------------------------------------------------------------------


def _serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from app.__main__ import serve
    from app.settings import ExposureError, Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        serve(Settings(**overrides))
    except ExposureError as exc:
        raise CommandError(str(exc), status=2) from exc
    return 0


def _worker(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from app.logs import configure_logging
    from app.settings import Settings

    settings = Settings()
    try:
        worker_main = importlib.import_module("service.serving.distributed.worker_main")
    except ImportError as exc:
        raise CommandError(
            f"the distributed worker is not available here ({exc}); it needs the full package "
            "(torch, transformers) and service.serving.distributed",
            status=2,
        ) from exc
    configure_logging(settings.log_level, settings.log_format)
    _serve_worker_metrics(settings)
    worker_main.run_worker(settings.to_service_config())
    return 0


def _serve_worker_metrics(settings: Settings) -> None:
    """The worker's Prometheus endpoint, `http://KVZIP_WORKER_METRICS_HOST:PORT/metrics`
    (prometheus-client's own server, on a daemon thread); none when the port is 0."""
    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    if not port:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise CommandError(
            f"cannot serve the worker's metrics on {host}:{port} ({exc}): give each worker on "
            "a host its own KVZIP_WORKER_METRICS_PORT, or 0 for none",
            status=2,
        ) from exc


def _calibrate(argv: Sequence[str]) -> int:
    """`kvzip calibrate[-scorer] ...` are the engine's own command line (service.commands)."""
    try:
        engine_cli = importlib.import_module("service.commands")
    except ImportError as exc:
        raise CommandError(f"{argv[0]} needs the engine (torch): {exc}", status=2) from exc
    return int(engine_cli.main(list(argv)))


# --- parser ------------------------------------------------------------------------------------


def _client_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--url", default=default, help=f"server (KVZIP_URL; {DEFAULT_URL})")
    parser.add_argument("--api-key", default=default, help="Bearer key (KVZIP_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvzip", description="KVzip context service: serve it, or use it over HTTP."
    )
    _client_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, client: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if client:
            _client_options(cmd, argparse.SUPPRESS)
        return cmd

    serve = command("serve", "run the HTTP service (settings from KVZIP_* variables)", False)
    serve.add_argument("--host", help="bind address (KVZIP_HOST)")
    serve.add_argument("--port", type=int, help="port (KVZIP_PORT)")
    serve.set_defaults(run=_serve)
    command("worker", "run a distributed-mode worker (KVZIP_MODE settings)", False).set_defaults(
        run=_worker
    )
    sub.add_parser("calibrate", help="head scores for method kvzip_head (loads the model)")
    sub.add_parser("calibrate-scorer", help="the predictor of method kvzap (loads the model)")

    ingest = command("ingest", "register a document and wait for it, with a progress bar")
    ingest.add_argument("file", help="text file, or - for stdin")
    ingest.add_argument("--display-name", help="label (default: the file name)")
    ingest.add_argument("--method", help="compression method (server default: kvzip)")
    ingest.add_argument("--ratio", type=float, help="kept fraction of KV pairs, in (0, 1]")
    ingest.add_argument("--system", help="system instruction, kept in the protected prefix")
    ingest.add_argument("--ttl", type=float, help="lifetime in seconds (server default 1 h)")
    ingest.add_argument("--poll", type=float, default=0.5, help="seconds between polls")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.set_defaults(run=_ingest)

    ask = command("ask", "ask a context a question; the answer streams to stdout")
    ask.add_argument("context_id", metavar="ID")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    ask.add_argument("--verbose", "-v", action="store_true", help="usage and timings on stderr")
    ask.set_defaults(run=_ask)

    ls = command("ls", "list contexts (every page)")
    ls.add_argument("--page-size", type=int, default=100)
    ls.set_defaults(run=_ls)

    rm = command("rm", "delete contexts from every tier")
    rm.add_argument("context_ids", nargs="+", metavar="ID")
    rm.set_defaults(run=_rm)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if argv[:1] in (["calibrate"], ["calibrate-scorer"]):
            return _calibrate(argv)
        args = build_parser().parse_args(argv)
        return int(args.run(args, out, err))
    except CommandError as exc:
        err.write(f"kvzip: {exc}\n")
        return exc.status
    except httpx.TransportError as exc:
        err.write(f"kvzip: cannot reach the server: {exc}\n")
        return 2
    except OSError as exc:
        err.write(f"kvzip: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
