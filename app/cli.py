"""`kvzip`: the command line. It talks to a running server with `kvzip.client`, never torch.

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
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from kvzip.client import (
    APIConnectionError,
    APIError,
    Client,
    CompressionSpec,
    Context,
    ContextFailedError,
    CreateOptions,
    KVzipError,
    QueryOptions,
)
from kvzip.client.plans import DEFAULT_URL

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["build_parser", "main"]


class CommandError(Exception):
    """A failure to report on stderr with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- client commands --------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("KVZIP_URL") or DEFAULT_URL
    return Client(url, args.api_key or os.environ.get("KVZIP_API_KEY"))


def _refusal(exc: KVzipError) -> str:
    """`404: context ... not found`; an error that ended a stream has no status."""
    return f"{exc.status}: {exc.message}" if exc.status is not None else exc.message


def _rfc3339(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _ingest(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    options: CreateOptions = {"wait": False, "system": args.system or None, "ttl_seconds": args.ttl}
    if args.display_name or args.file != "-":
        options["display_name"] = args.display_name or Path(args.file).name
    compression: CompressionSpec = {}
    if args.method:
        compression["method"] = args.method
    if args.ratio:
        compression["ratio"] = args.ratio
    if args.quantization:
        compression["quantization"] = args.quantization
    if compression:
        options["compression"] = compression
    with _client(args) as client:
        info = client.create_context(text, **options)
        if info.state == "PROCESSING":
            info = _follow(client, info, args.poll, err, quiet=args.quiet)
    if info.state == "FAILED":
        raise ContextFailedError(info)
    err.write(
        f"{info.id}: {info.usage.context_tokens} tokens, kept "
        f"{info.compression.kept_fraction:.3f} of the KV pairs ({info.compression.bytes} "
        f"bytes), expires {_rfc3339(info.expire_time)}\n"
    )
    out.write(info.id + "\n")
    return 0


def _follow(client: Client, info: Context, poll: float, err: TextIO, quiet: bool) -> Context:
    """Wait for the context to leave PROCESSING, drawing `progress` as a bar."""
    with tqdm(
        total=100, unit="%", desc="scoring", file=err, disable=quiet, bar_format="{l_bar}{bar}|"
    ) as bar:

        def show(seen: Context) -> None:
            if seen.state != "FAILED":
                bar.update(max(0, round(100 * seen.progress) - bar.n))

        return client.wait_until_ready(info, timeout=None, poll_interval=poll, on_progress=show)


def _ask(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    options: QueryOptions = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }
    with (
        _client(args) as client,
        client.stream_query(args.context_id, args.question, **options) as stream,
    ):
        for delta in stream:
            out.write(delta)
            out.flush()
    if args.verbose:
        answer = stream.result
        usage, timings = answer.usage, answer.timings
        err.write(
            f"\n[{usage.completion_tokens} tokens, cached "
            f"{usage.prompt_tokens_details.cached_tokens}, first token after "
            f"{timings.ttft_s:.3f} s, {answer.finish_reason}]"
        )
    out.write("\n")
    return 0


def _ls(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rows = [("ID", "STATE", "TOKENS", "KEPT", "EXPIRES", "NAME")]
    with _client(args) as client:
        for info in client.iter_contexts(args.page_size):
            state = info.state + (f" {info.progress:.0%}" if info.state == "PROCESSING" else "")
            rows.append(
                (
                    info.id,
                    state,
                    str(info.usage.context_tokens),
                    f"{info.compression.kept_fraction:.3f}",
                    _rfc3339(info.expire_time) or "-",
                    info.display_name or "",
                )
            )
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
                client.delete_context(context_id)
                out.write(f"deleted {context_id}\n")
            except APIError as exc:
                err.write(f"kvzip: {context_id}: {_refusal(exc)}\n")
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
    ingest.add_argument(
        "--quantization",
        choices=("none", "fp8", "int4"),
        help="how the kept keys/values are stored (server default: fp8)",
    )
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
    except APIConnectionError as exc:
        err.write(f"kvzip: {exc}\n")
        return 2
    except KVzipError as exc:
        err.write(f"kvzip: {_refusal(exc)}\n")
        return 1
    except OSError as exc:
        err.write(f"kvzip: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
