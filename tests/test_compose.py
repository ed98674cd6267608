"""docker-compose.yml, the Dockerfile and .dockerignore, checked against the code they deploy.

Why at parse level: no Docker engine runs on the development and CI machines, so the stack
cannot be started here. What breaks a deployment silently is a name the files share with
the code going stale: a ``METAREC_*`` variable the configuration no longer reads (it would
refuse to start), a command or flag that no longer exists, a topic nobody creates (the
broker does not auto-create), a dependency on a service that was renamed. Each is checked
against the code itself, with values interpolated as Compose would on a host that sets no
variables (so every ``${VAR:-default}`` takes its default).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from metarec.config import (
    ENV_PREFIX,
    KAFKA_ENV_PREFIX,
    SETTINGS,
    Settings,
    settings_from_args,
)
from metarec.errors import ConfigError
from metarec.local.devservices import DEFAULT_TOPICS
from metarec.services.topics import TopicSpec, topic_plan

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

#: The services that run metarec code from the project's images, and the infrastructure.
METAREC_SERVICES = ("kafka-init", "consumer", "aggregator", "aggregator-gpu", "demo-producer")
AGGREGATORS = ("aggregator", "aggregator-gpu")
#: Services that run a loop with a heartbeat, probed by a healthcheck.
LOOPS = ("consumer", *AGGREGATORS)
#: The optional services and their profile; every other service starts by default.
PROFILES = {
    "aggregator-gpu": ["gpu"],
    "demo-producer": ["demo"],
    "prometheus": ["monitoring"],
    "grafana": ["monitoring"],
}
KAFKA, KAFKA_INIT, REDIS = "kafka", "kafka-init", "redis"
#: Compose's restart policies; an unquoted ``restart: no`` is YAML 1.1's ``False``.
RESTART_POLICIES = frozenset({"no", "always", "on-failure", "unless-stopped"})
#: What ``depends_on`` conditions require of their target.
HEALTHY, COMPLETED, STARTED = (
    "service_healthy",
    "service_completed_successfully",
    "service_started",
)
KNOWN_ENV = frozenset(spec.env for spec in SETTINGS)
TOPIC_FIELDS = tuple(spec.name for spec in SETTINGS if spec.kind == "topic")

# $$, ${NAME}, ${NAME<op>word} with op one of - :- ? :? + :+, and $NAME, as in Compose.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<word>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


# --- loading and Compose semantics -------------------------------------------------------


def interpolate(text: str) -> str:
    """``text`` as Compose interpolates it when no variable is set on the host.

    >>> interpolate("${TOP_K:-20}/${UNSET}/$$HOME")
    '20//$HOME'
    """

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        op, word = match["op"], match["word"] or ""
        if op in ("-", ":-"):
            if "$" in word:
                raise ValueError(f"nested interpolation is not checked here: {text!r}")
            return word
        if op in ("?", ":?"):
            raise ValueError(f"{match[0]} requires a host variable: {text!r}")
        return ""  # ${VAR}, $VAR and ${VAR:+word} with VAR unset

    return _INTERPOLATION.sub(substitute, text)


def _mapping(value: object, what: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{what} should be a mapping, got {value!r}"
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        return _mapping(yaml.safe_load(f), "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw = _mapping(compose.get("services"), "services")
    return {name: _mapping(svc, f"service {name}") for name, svc in raw.items()}


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment``, interpolated; a bare name (host pass-through) is ``""``."""
    raw = service.get("environment") or {}
    pairs: list[tuple[str, object]]
    if isinstance(raw, list):
        pairs = []
        for item in raw:
            key, sep, text = str(item).partition("=")
            pairs.append((key, text if sep else None))
    else:
        pairs = list(_mapping(raw, "environment").items())
    env: dict[str, str] = {}
    for var, value in pairs:
        assert not isinstance(value, bool), (
            f"{var}: {value!r} is a YAML boolean; quote it so the process gets a string"
        )
        env[str(var)] = "" if value is None else interpolate(str(value))
    return env


def metarec_env(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: v for k, v in service_env(service).items() if k.startswith(ENV_PREFIX)}


def argv_of(value: object) -> list[str]:
    """A ``command``/``entrypoint`` as an argv: a list as is, a string split like Compose."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(interpolate(value))
    assert isinstance(value, list), f"expected a string or a list, got {value!r}"
    return [interpolate(str(v)) for v in value]


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """Target service to condition (the short list form means ``service_started``)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {str(name): STARTED for name in raw}
    return {
        str(name): str(_mapping(spec or {}, f"depends_on.{name}").get("condition", STARTED))
        for name, spec in _mapping(raw, "depends_on").items()
    }


def settings_of(service: Mapping[str, Any]) -> Settings:
    return Settings.from_env(metarec_env(service))


def parse_or_fail(
    parser: argparse.ArgumentParser,
    args: list[str],
    what: str,
) -> argparse.Namespace:
    """``parser.parse_args(args)``, with argparse's exit turned into a test failure."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{what}: the parser rejects {args}: {err.getvalue().strip()}")


def console_scripts(pyproject: Mapping[str, Any]) -> dict[str, str]:
    return dict(pyproject.get("project", {}).get("scripts", {}))


def build_args(service: Mapping[str, Any]) -> dict[str, str]:
    build = service.get("build")
    if not isinstance(build, dict):
        return {}
    args = build.get("args") or {}
    if isinstance(args, list):
        return dict(str(a).partition("=")[::2] for a in args)
    return {str(k): interpolate(str(v)) for k, v in _mapping(args, "build.args").items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", "", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def tensorflow_floor(pyproject: Mapping[str, Any]) -> str:
    """The version in the ``train`` extra's ``tensorflow-cpu>=X`` requirement."""
    deps = [d.split(";")[0].strip() for d in pyproject["project"]["optional-dependencies"]["train"]]
    floors = [m[1] for d in deps if (m := re.fullmatch(r"tensorflow-cpu>=([0-9][0-9.]*)", d))]
    assert len(floors) == 1, f"expected one tensorflow-cpu>=X requirement in {deps}"
    return floors[0]


# --- (a) every METAREC_* variable is one the configuration reads ---------------------------


def test_metarec_services_are_the_ones_built_from_the_project(
    services: dict[str, dict[str, Any]],
) -> None:
    built = {name for name, svc in services.items() if "build" in svc}
    assert built == set(METAREC_SERVICES)


def test_compose_interpolation_reference() -> None:
    assert interpolate("${A:-x}${B-y}${C}${D:+z}$E$$") == "xy$"
    with pytest.raises(ValueError):
        interpolate("${A:?set A}")


@pytest.mark.parametrize("name", METAREC_SERVICES)
def test_metarec_variables_are_settings_the_program_reads(
    services: dict[str, dict[str, Any]],
    name: str,
) -> None:
    env = metarec_env(services[name])
    assert env, f"{name} sets no METAREC_* variable"
    for var in env:
        assert var in KNOWN_ENV or var.startswith(KAFKA_ENV_PREFIX), (
            f"{name}: {var} is neither a setting in metarec.config.SETTINGS nor a "
            f"{KAFKA_ENV_PREFIX}<NAME> pass-through"
        )
    try:
        Settings.from_env(env)
    except ConfigError as exc:
        pytest.fail(f"{name}: metarec would refuse to start: {exc}")


def test_only_metarec_services_set_metarec_variables(
    services: dict[str, dict[str, Any]],
) -> None:
    # Infrastructure containers must not carry METAREC_* by accident; where one does, the
    # check above would not cover it.
    for name, svc in services.items():
        if name not in METAREC_SERVICES:
            assert not metarec_env(svc), f"{name} sets {sorted(metarec_env(svc))}"


# --- (b) every command a metarec service runs exists and parses -----------------------------


def _check_python_module(module: str, args: list[str], env: dict[str, str], what: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{what}: module {module!r} is not importable"
    main_name = module
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        main_name = f"{module}.__main__"
        assert importlib.util.find_spec(main_name) is not None, (
            f"{what}: package {module!r} has no __main__ module, so `python -m {module}` fails"
        )
    main_spec = importlib.util.find_spec(main_name)
    assert main_spec is not None and main_spec.origin, f"{what}: {main_name} has no source"
    # Importing it below must not start the service itself.
    assert _has_main_guard(Path(main_spec.origin)), (
        f"{what}: {main_name} runs at import; put its call to main() under "
        '`if __name__ == "__main__":` (python -m still runs it)'
    )
    main_module = importlib.import_module(main_name)
    build_parser = getattr(main_module, "build_parser", None)
    if build_parser is None:
        assert not args, (
            f"{what}: {main_name} exposes no build_parser(), so its arguments {args} "
            "cannot be checked"
        )
        Settings.from_env(env)
        return
    _check_parsed(build_parser(), args, env, what)


def _has_main_guard(path: Path) -> bool:
    """Whether a module's top level runs nothing but definitions and a ``__main__`` guard."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = False
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            guarded = True
        elif isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
            return False  # a bare call such as sys.exit(main()) at module level
        elif isinstance(node, ast.Raise):
            return False  # raise SystemExit(main())
    return guarded


def _check_console_script(
    script: str,
    args: list[str],
    env: dict[str, str],
    pyproject: Mapping[str, Any],
    what: str,
) -> None:
    scripts = console_scripts(pyproject)
    assert script in scripts, f"{what}: pyproject.toml declares no console script {script!r}"
    module_name, _, func = scripts[script].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, func, None)), f"{what}: {scripts[script]} is not callable"
    build_parser = getattr(module, "build_parser", None)
    assert build_parser is not None, f"{what}: {module_name} exposes no build_parser()"
    _check_parsed(build_parser(), args, env, what)


def _check_parsed(
    parser: argparse.ArgumentParser,
    args: list[str],
    env: dict[str, str],
    what: str,
) -> None:
    namespace = parse_or_fail(parser, args, what)
    try:
        # Where the command takes the settings flags, flags and environment resolve together.
        if all(hasattr(namespace, spec.name) for spec in SETTINGS):
            settings_from_args(namespace, environ=env)
        else:
            Settings.from_env(env)
    except ConfigError as exc:
        pytest.fail(f"{what}: metarec would refuse to start: {exc}")


@pytest.mark.parametrize("name", METAREC_SERVICES)
def test_metarec_commands_exist_and_accept_their_arguments(
    services: dict[str, dict[str, Any]],
    pyproject: dict[str, Any],
    name: str,
) -> None:
    svc = services[name]
    # The Dockerfile has no ENTRYPOINT (checked below), so the command is the whole argv.
    assert "entrypoint" not in svc, f"{name}: the image's command is the compose command"
    argv = argv_of(svc.get("command"))
    env = metarec_env(svc)
    what = f"{name} ({shlex.join(argv)})"
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        _check_python_module(argv[2], argv[3:], env, what)
    elif argv and argv[0] in console_scripts(pyproject):
        _check_console_script(argv[0], argv[1:], env, pyproject, what)
    else:
        pytest.fail(f"{what}: expected `python -m MODULE ...` or a console script of the project")


# --- (c) the deployment's shape ----------------------------------------------------------


def test_consumer_runs_two_replicas_within_the_events_partitions(
    services: dict[str, dict[str, Any]],
) -> None:
    replicas = _mapping(services["consumer"].get("deploy"), "consumer.deploy").get("replicas")
    assert replicas == 2
    # A replica beyond the events topic's partitions would sit idle in the group.
    events = settings_of(services["consumer"]).events_topic
    assert created_topics(services)[events].partitions >= replicas


def test_the_gpu_aggregator_reserves_a_gpu_and_uses_the_cuda_build(
    services: dict[str, dict[str, Any]],
    pyproject: dict[str, Any],
) -> None:
    svc = services["aggregator-gpu"]
    deploy = _mapping(svc.get("deploy"), "aggregator-gpu.deploy")
    reservations = _mapping(
        _mapping(deploy.get("resources"), "deploy.resources").get("reservations"),
        "deploy.resources.reservations",
    )
    devices = reservations.get("devices")
    assert isinstance(devices, list) and devices, "the GPU aggregator reserves no device"
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == "all" or int(d.get("count", 0)) >= 1)
        for d in devices
    ), devices
    args = build_args(svc)
    assert args.get("TF_PACKAGE") == f"tensorflow[and-cuda]>={tensorflow_floor(pyproject)}"
    assert args.get("EXTRAS") == "train"
    # Its own tag: the GPU build must not overwrite the images the other services run.
    assert svc.get("image") not in {
        services[n].get("image") for n in METAREC_SERVICES if n != "aggregator-gpu"
    }


def test_the_default_aggregator_needs_no_gpu_runtime(
    services: dict[str, dict[str, Any]],
) -> None:
    svc = services["aggregator"]
    assert "deploy" not in svc or "resources" not in (svc["deploy"] or {}), svc.get("deploy")
    assert "profiles" not in svc
    assert build_args(svc) == {"EXTRAS": "train"}
    assert svc.get("image") != services["consumer"].get("image")
    # Both aggregators run the same program with the same settings.
    assert svc.get("command") == services["aggregator-gpu"].get("command")
    assert metarec_env(svc) == metarec_env(services["aggregator-gpu"])


def test_the_consumer_image_carries_no_tensorflow(services: dict[str, dict[str, Any]]) -> None:
    for name in ("consumer", "demo-producer", KAFKA_INIT):
        args = build_args(services[name])
        assert "train" not in args.get("EXTRAS", "") and not args.get("TF_PACKAGE"), name
        assert services[name].get("image") == services["consumer"].get("image"), name


def test_profiles_leave_a_default_stack_that_needs_no_gpu(
    services: dict[str, dict[str, Any]],
) -> None:
    assert {n: s["profiles"] for n, s in services.items() if "profiles" in s} == PROFILES
    # The way to swap aggregators is documented where people read it.
    header = COMPOSE_FILE.read_text(encoding="utf-8").split("\nname:", 1)[0]
    assert "--profile gpu up -d --build --scale aggregator=0" in header
    assert "--profile demo" in header


@pytest.mark.parametrize("name", LOOPS)
def test_services_with_a_loop_have_a_healthcheck_on_their_health_port(
    services: dict[str, dict[str, Any]],
    name: str,
) -> None:
    svc = services[name]
    check = _mapping(svc.get("healthcheck"), f"{name}.healthcheck")
    probe = " ".join(argv_of(check.get("test")))
    port = settings_of(svc).metrics_port
    assert port > 0, f"{name}: METAREC_METRICS_PORT is off, so nothing answers the probe"
    assert f"http://127.0.0.1:{port}/healthz" in probe, probe
    # The probe runs in the image, which has Python but not curl or wget.
    assert argv_of(check.get("test"))[:2] == ["CMD", "python"], check.get("test")


def test_redis_persists_with_aof_under_a_memory_cap(services: dict[str, dict[str, Any]]) -> None:
    svc = services[REDIS]
    assert str(svc.get("image", "")).startswith("redis:7")
    argv = argv_of(svc.get("command"))
    assert argv[:1] == ["redis-server"]
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options.get("--appendonly") == "yes", argv
    assert options.get("--appendfsync") == "everysec", argv
    assert re.fullmatch(r"\d+[kmg]b", options.get("--maxmemory", "")), argv
    # Evicting an offset or a state key would break the exactly-once guard.
    assert options.get("--maxmemory-policy") == "noeviction", argv
    assert any(str(v).endswith(":/data") for v in svc.get("volumes", [])), "no volume on /data"
    assert "redis-cli" in argv_of(_mapping(svc.get("healthcheck"), "healthcheck").get("test"))


def test_kafka_is_a_single_kraft_node_of_the_apache_image(
    services: dict[str, dict[str, Any]],
) -> None:
    svc = services[KAFKA]
    assert re.fullmatch(r"apache/kafka:[34]\.\d+\.\d+", str(svc.get("image"))), svc.get("image")
    env = service_env(svc)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not [k for k in env if "ZOOKEEPER" in k], "KRaft needs no ZooKeeper setting"
    assert not [n for n, s in services.items() if "zookeeper" in str(s.get("image", ""))]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    protocol_map = env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    protocols = dict(p.split(":", 1) for p in protocol_map.split(","))
    assert set(listeners) <= set(protocols), (listeners, protocols)
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{env['KAFKA_NODE_ID']}@{KAFKA}:{listeners[controller][1]}"], voters
    for setting in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[setting] == "1", f"{setting} must be 1 on a one-node cluster"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    log_dir = env["KAFKA_LOG_DIRS"]
    assert any(str(v).endswith(f":{log_dir}") for v in svc.get("volumes", [])), (
        f"no volume on the log dir {log_dir}"
    )
    assert "kafka-topics.sh" in " ".join(
        argv_of(_mapping(svc.get("healthcheck"), "healthcheck").get("test"))
    )


def _listeners(text: str) -> dict[str, tuple[str, str]]:
    """``NAME://host:port,...`` as name to (host, port)."""
    out = {}
    for item in text.split(","):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, port)
    return out


def test_metarec_services_reach_kafka_and_redis_by_service_name(
    services: dict[str, dict[str, Any]],
) -> None:
    advertised = set(
        _listeners(service_env(services[KAFKA])["KAFKA_ADVERTISED_LISTENERS"]).values()
    )
    for name in METAREC_SERVICES:
        settings = settings_of(services[name])
        for server in settings.kafka_bootstrap.split(","):
            host, _, port = server.rpartition(":")
            assert (host, port) in advertised, (
                f"{name}: bootstrap {server} is not an advertised listener of {KAFKA}"
            )
        redis_host = settings.redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        assert redis_host in (REDIS, f"{REDIS}:6379"), f"{name}: Redis at {redis_host}"


def created_topics(services: Mapping[str, Mapping[str, Any]]) -> dict[str, TopicSpec]:
    """What kafka-init creates: ``metarec topics`` with its own settings."""
    assert argv_of(services[KAFKA_INIT].get("command")) == ["metarec", "topics"]
    return topic_plan(settings_of(services[KAFKA_INIT]))


def test_kafka_init_creates_every_topic_the_services_use(
    services: dict[str, dict[str, Any]],
) -> None:
    init = services[KAFKA_INIT]
    assert init.get("restart") == "no"
    assert depends_on(init).get(KAFKA) == HEALTHY
    topics = created_topics(services)
    for name in METAREC_SERVICES:
        settings = settings_of(services[name])
        for field in TOPIC_FIELDS:
            topic = getattr(settings, field)
            assert topic in topics, f"{name}'s {field} {topic!r} is not created by {KAFKA_INIT}"
    # The same plan as `metarec dev up`: one definition of the partition counts.
    assert {n: t.partitions for n, t in topics.items()} == dict(DEFAULT_TOPICS)


def test_the_events_retention_is_the_one_the_aggregator_is_configured_with(
    services: dict[str, dict[str, Any]],
) -> None:
    events = settings_of(services[KAFKA_INIT]).events_topic
    hours = int(created_topics(services)[events].config["retention.ms"]) // 3_600_000
    for name in AGGREGATORS:
        assert settings_of(services[name]).events_retention_hours == hours, name


def test_restart_policies_are_compose_strings(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "restart" in svc:
            assert svc["restart"] in RESTART_POLICIES, f"{name}: restart {svc['restart']!r}"
    for name in LOOPS:
        assert services[name].get("restart") == "unless-stopped"
    assert services["demo-producer"].get("restart") == "no"


# --- (d) dependencies --------------------------------------------------------------------


def test_every_dependency_exists_and_can_satisfy_its_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        for target, condition in depends_on(svc).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert target != name, f"{name} depends on itself"
            assert condition in (HEALTHY, COMPLETED, STARTED), f"{name}: {condition!r}"
            if condition == HEALTHY:
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )
            if condition == COMPLETED:
                assert services[target].get("restart", "no") == "no", (
                    f"{name} waits for {target} to complete, but it restarts"
                )


def test_metarec_services_start_after_topics_exist(services: dict[str, dict[str, Any]]) -> None:
    for name in METAREC_SERVICES:
        if name != KAFKA_INIT:
            assert depends_on(services[name]).get(KAFKA_INIT) == COMPLETED, name
    for name in LOOPS:
        assert depends_on(services[name]).get(REDIS) == HEALTHY, name


# --- the image ---------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_without_entrypoint(
    pyproject: dict[str, Any],
) -> None:
    instructions = dockerfile_instructions()
    assert ("FROM", "python:3.11-slim") in instructions
    assert not [i for i in instructions if i[0] == "ENTRYPOINT"], "compose gives the command"
    users = [arg for kw, arg in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    args = dict(arg.partition("=")[::2] for kw, arg in instructions if kw == "ARG")
    # By default the image is the consumer's: no extra, no TensorFlow.
    assert args.get("EXTRAS") == '""' and args.get("TF_PACKAGE") == '""', args
    assert set(pyproject["project"]["optional-dependencies"]) >= {"train", "eval", "local"}
    runs = " ".join(arg for kw, arg in instructions if kw == "RUN")
    assert "$TF_PACKAGE" in runs and "$EXTRAS" in runs and "pip install --no-cache-dir" in runs


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git"} <= patterns
    assert not patterns & {
        "metarec",
        "consumer",
        "producer",
        "pyproject.toml",
        "README.md",
        "*",
        "*.md",
        "*.toml",
    }
