"""Helpers of the deployment tests: the compose file as Compose reads it (YAML anchors and
merge keys resolved, `${VAR:-default}` interpolated), the Dockerfiles' instructions, and
.dockerignore matching. No Docker needed."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = {"api": ROOT / "docker/Dockerfile.api", "worker": ROOT / "docker/Dockerfile.worker"}
SCHEMA_FILE = Path(__file__).with_name("compose_spec.json")

_VARIABLE = re.compile(
    r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\})"
)


def variables(text: str) -> set[str]:
    """Every variable a compose text interpolates (`${NAME...}`)."""
    return {m.group(1) for m in _VARIABLE.finditer(text) if m.group(1)}


def interpolate_text(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-d}, ${V-d}, ${V:?msg}, ${V?msg}, ${V:+x}, $$."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name is None:
            return "$"
        present = name in env
        value = env.get(name, "")
        if op in (":-", "-"):
            empty = not value if op == ":-" else not present
            return interpolate_text(arg, env) if empty else value
        if op in (":?", "?"):
            if (op == ":?" and not value) or not present:
                raise KeyError(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return interpolate_text(arg, env) if (value if op == ":+" else present) else ""
        return value

    return _VARIABLE.sub(substitute, value)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file with anchors merged and variables interpolated from `env` (default:
    nothing set, so every default applies)."""
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return dict(interpolate(data, env or {}))


def env_example_names() -> set[str]:
    """Variables .env.example sets or shows (`NAME=` or `# NAME=`)."""
    pattern = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
    return set(pattern.findall(ENV_EXAMPLE.read_text()))


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment` as a mapping (list form `K=V` accepted)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- Dockerfiles -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def env(self, build_args: dict[str, str] | None = None) -> dict[str, str]:
        """The final stage's ENV, `${ARG}` references resolved from ARG defaults and
        `build_args` (PATH-like references to the base's own variables are left as text)."""
        args = {k: v or "" for k, v in self.global_args.items()}
        out: dict[str, str] = {}
        for ins in self.final.instructions:
            if ins.keyword == "ARG":
                name, _, default = ins.args.partition("=")
                args.setdefault(name, default)
            if ins.keyword != "ENV":
                continue
            for token in shlex.split(ins.args):
                name, _, value = token.partition("=")
                out[name] = re.sub(
                    r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                    lambda m: (build_args or {}).get(m.group(1), args.get(m.group(1), m.group(0))),
                    value,
                )
        return out

    def exec_form(self, keyword: str) -> list[str]:
        """The final stage's CMD/ENTRYPOINT in exec form (a JSON list)."""
        import json

        found = self.final.all(keyword)
        assert found, f"{self.path.name}: no {keyword}"
        value = json.loads(found[-1].args)
        assert isinstance(value, list)
        return [str(v) for v in value]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage, continuation lines joined, comments and blank lines dropped."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, f"{path.name}: dangling continuation"
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}:{number}: {keyword} before FROM"
            name, eq, default = args.partition("=")
            global_args[name] = default if eq else None
        else:
            stages[-1].instructions.append(Instruction(keyword, args, number))
    return Dockerfile(path, global_args, stages)


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore_excludes(relative: str, root: Path = ROOT) -> bool:
    """Whether .dockerignore leaves `relative` (a path in the build context) out: Docker's
    rule, the last matching pattern wins, `!` re-includes, a match on a parent folder
    counts."""
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = _glob_regex(body)
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        else:
            char = pattern[i]
            out += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            i += 1
    return re.compile(out)


__all__ = [
    "COMPOSE_FILE",
    "DOCKERFILES",
    "ENV_EXAMPLE",
    "ROOT",
    "SCHEMA_FILE",
    "Dockerfile",
    "dockerignore_excludes",
    "env_example_names",
    "environment",
    "interpolate",
    "interpolate_text",
    "load_compose",
    "parse_dockerfile",
    "variables",
]
