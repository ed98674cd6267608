"""deploy/k8s/, the Kubernetes example, checked against the code it deploys.

Why at parse level: neither kubectl nor a cluster is available where the tests run, so the
manifests cannot be applied here. What breaks them silently is a name they share with the
code going stale: a ``METAREC_*`` variable the configuration no longer reads (the process
would refuse to start), a subcommand or flag that no longer exists, a probe on a port or
path nobody serves, a user id the image does not have, a secret left in a ConfigMap. Each
is checked against the code itself, with the environment each container would get.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from metarec.cli import build_parser
from metarec.config import ENV_PREFIX, KAFKA_ENV_PREFIX, SETTINGS, Settings, settings_from_args
from metarec.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"

NAMESPACE = "metarec"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
#: The API group/version of each kind the example uses.
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
}
#: Each workload, by its component label: its kind and the ``metarec`` subcommand it runs.
WORKLOADS = {
    "consumer": ("Deployment", "consume"),
    "aggregator": ("Deployment", "aggregate"),
    "topics": ("Job", "topics"),
}
#: Workloads that run a loop with a heartbeat, served on METAREC_METRICS_PORT.
LOOPS = ("consumer", "aggregator")
#: The compose services the loops mirror, for their shutdown grace periods.
COMPOSE_SERVICES = {"consumer": "consumer", "aggregator": "aggregator"}
#: Image tags built with the `train` extra, i.e. with TensorFlow (Dockerfile header).
TRAIN_TAGS = ("train", "gpu")
CONSUMER_IMAGE = "metarec:cpu"
#: Settings every workload must agree on: they name the shared topics, keys and ports.
SHARED_SETTINGS = (
    "kafka_bootstrap",
    "redis_url",
    "key_prefix",
    "events_topic",
    "items_topic",
    "users_topic",
    "dlq_topic",
    "model_topic",
    "partitions",
    "events_retention_hours",
    "event_types",
    "metrics_port",
)
KNOWN_ENV = frozenset(spec.env for spec in SETTINGS)
SECRET_ENV = frozenset(spec.env for spec in SETTINGS if spec.secret)
#: Name fragments that mark a pass-through librdkafka setting as a secret.
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "JAAS")

Doc = dict[str, Any]


# --- loading -----------------------------------------------------------------------------


def _mapping(value: object, what: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{what} should be a mapping, got {value!r}"
    return value


def _list(value: object, what: str) -> list[Any]:
    assert isinstance(value, list), f"{what} should be a list, got {value!r}"
    return value


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))


def describe(doc: Mapping[str, Any]) -> str:
    """``Kind/name`` of a document, for messages."""
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


@pytest.fixture(scope="module")
def documents() -> list[tuple[str, Doc]]:
    """(file name, document) for every non-empty document of every manifest."""
    files = manifest_files()
    assert files, f"no manifests in {K8S_DIR}"
    out = []
    for path in files:
        with path.open(encoding="utf-8") as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    out.append((path.name, _mapping(doc, f"{path.name} document {i}")))
    return out


def _objects(documents: list[tuple[str, Doc]], kind: str) -> dict[str, Doc]:
    return {str(doc["metadata"]["name"]): doc for _, doc in documents if doc.get("kind") == kind}


@pytest.fixture(scope="module")
def configmaps(documents: list[tuple[str, Doc]]) -> dict[str, dict[str, Any]]:
    return {
        name: dict(doc.get("data") or {}) for name, doc in _objects(documents, "ConfigMap").items()
    }


@pytest.fixture(scope="module")
def secrets(documents: list[tuple[str, Doc]]) -> dict[str, dict[str, Any]]:
    """Each Secret's keys and values: ``data`` decoded, ``stringData`` over it (as the API
    server merges them)."""
    out: dict[str, dict[str, Any]] = {}
    for name, doc in _objects(documents, "Secret").items():
        values: dict[str, Any] = {
            k: base64.b64decode(str(v)).decode() for k, v in (doc.get("data") or {}).items()
        }
        values.update(doc.get("stringData") or {})
        out[name] = values
    return out


@pytest.fixture(scope="module")
def workloads(documents: list[tuple[str, Doc]]) -> dict[str, Doc]:
    """Each workload by its component label; exactly one per component."""
    found: dict[str, list[Doc]] = {}
    for _, doc in documents:
        if doc.get("kind") in ("Deployment", "Job"):
            labels = (doc.get("metadata") or {}).get("labels") or {}
            found.setdefault(str(labels.get(COMPONENT_LABEL)), []).append(doc)
    assert set(found) == set(WORKLOADS), (
        f"expected one workload per {COMPONENT_LABEL} in {sorted(WORKLOADS)}, found {sorted(found)}"
    )
    for component, docs in found.items():
        assert len(docs) == 1, f"{component}: {len(docs)} workloads: {[describe(d) for d in docs]}"
    return {component: docs[0] for component, docs in found.items()}


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    template = _mapping(
        _mapping(workload.get("spec"), f"{describe(workload)}.spec").get("template"),
        f"{describe(workload)}.spec.template",
    )
    return _mapping(template.get("spec"), f"{describe(workload)}.spec.template.spec")


def pod_labels(workload: Mapping[str, Any]) -> dict[str, Any]:
    template = workload["spec"]["template"]
    return dict((template.get("metadata") or {}).get("labels") or {})


def containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [
        _mapping(c, f"{describe(workload)} container")
        for c in _list(spec.get("containers"), f"{describe(workload)} containers")
        + list(spec.get("initContainers") or [])
    ]


def argv_of(container: Mapping[str, Any]) -> list[str]:
    """What the container runs: ``command`` then ``args`` (the image has no ENTRYPOINT)."""
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def main_container(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The one container that runs metarec."""
    runs = [c for c in containers(workload) if argv_of(c)[:1] == ["metarec"]]
    assert len(runs) == 1, (
        f"{describe(workload)}: expected one container running `metarec ...`, found "
        f"{[c.get('name') for c in runs]}"
    )
    return runs[0]


def container_env(
    container: Mapping[str, Any],
    configmaps: Mapping[str, Mapping[str, Any]],
    secrets: Mapping[str, Mapping[str, Any]],
) -> dict[str, str]:
    """The environment Kubernetes gives a container: ``envFrom`` sources in order (a later
    one wins), then ``env`` over them."""
    name = container.get("name")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix", ""))
        if "configMapRef" in source:
            ref, objects, kind = source["configMapRef"]["name"], configmaps, "ConfigMap"
        elif "secretRef" in source:
            ref, objects, kind = source["secretRef"]["name"], secrets, "Secret"
        else:
            pytest.fail(f"{name}: envFrom {source} is neither a configMapRef nor a secretRef")
        assert ref in objects, f"{name}: envFrom names {kind} {ref!r}, which deploy/k8s lacks"
        env.update({prefix + str(k): str(v) for k, v in objects[ref].items()})
    for item in container.get("env") or []:
        var = str(item["name"])
        if "value" in item:
            env[var] = str(item["value"])
            continue
        ref = _mapping(item.get("valueFrom"), f"{name}: env {var} valueFrom")
        if "configMapKeyRef" in ref:
            key, objects = ref["configMapKeyRef"], configmaps
        elif "secretKeyRef" in ref:
            key, objects = ref["secretKeyRef"], secrets
        else:
            continue  # fieldRef and the like: values only a cluster knows
        assert key["name"] in objects and key["key"] in objects[key["name"]], (
            f"{name}: env {var} refers to {key}, which deploy/k8s lacks"
        )
        env[var] = str(objects[key["name"]][key["key"]])
    return env


def metarec_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}


def parse_or_fail(args: list[str], what: str) -> argparse.Namespace:
    """The real CLI parser on ``args``, with argparse's exit turned into a test failure."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{what}: `metarec` rejects {args}: {err.getvalue().strip()}")


@pytest.fixture(scope="module")
def settings(
    workloads: dict[str, Doc],
    configmaps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> dict[str, Settings]:
    """Each workload's settings, resolved as metarec resolves them at start."""
    out = {}
    for component, workload in workloads.items():
        container = main_container(workload)
        argv = argv_of(container)
        namespace = parse_or_fail(argv[1:], f"{component} ({' '.join(argv)})")
        env = metarec_env(container_env(container, configmaps, secrets))
        try:
            out[component] = settings_from_args(namespace, environ=env)
        except ConfigError as exc:
            pytest.fail(f"{component}: metarec would refuse to start: {exc}")
    return out


def dockerfile_user() -> tuple[int, int | None]:
    """The uid (and gid, if given) of the Dockerfile's last USER instruction."""
    text = re.sub(r"\\\n", "", DOCKERFILE.read_text(encoding="utf-8"))
    users = [
        line.split(None, 1)[1].strip()
        for line in text.splitlines()
        if line.strip().upper().startswith("USER ")
    ]
    assert users, "the Dockerfile has no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    # runAsNonRoot can verify only a numeric user; a name would need the image's passwd.
    assert uid.isdigit() and (not gid or gid.isdigit()), f"USER {users[-1]} is not numeric"
    return int(uid), int(gid) if gid else None


# --- the documents -----------------------------------------------------------------------


def test_every_document_is_a_named_object_in_the_metarec_namespace(
    documents: list[tuple[str, Doc]],
) -> None:
    seen: set[tuple[str, str]] = set()
    for file, doc in documents:
        kind = doc.get("kind")
        metadata = _mapping(doc.get("metadata"), f"{file}: {kind}.metadata")
        name = metadata.get("name")
        assert kind and name, f"{file}: a document without kind or metadata.name"
        assert kind in API_VERSIONS, f"{file}: {kind} is not a kind this example uses"
        assert doc.get("apiVersion") == API_VERSIONS[kind], (
            f"{file}: {kind}/{name} has apiVersion {doc.get('apiVersion')!r}, "
            f"expected {API_VERSIONS[kind]!r}"
        )
        if kind == "Namespace":
            assert name == NAMESPACE, f"{file}: Namespace {name!r}, expected {NAMESPACE!r}"
            assert "namespace" not in metadata, f"{file}: a Namespace is not namespaced"
        else:
            assert metadata.get("namespace") == NAMESPACE, (
                f"{file}: {kind}/{name} is in namespace {metadata.get('namespace')!r}, "
                f"not {NAMESPACE!r} (without one, kubectl uses the current context's)"
            )
        assert (kind, name) not in seen, f"{file}: {kind}/{name} is defined twice"
        seen.add((kind, name))
    assert ("Namespace", NAMESPACE) in seen, f"no Namespace {NAMESPACE!r} in deploy/k8s"


def test_values_the_api_server_requires_as_strings_are_strings(
    documents: list[tuple[str, Doc]],
    workloads: dict[str, Doc],
) -> None:
    # An unquoted 9108 or true is a YAML number or boolean, which the API server rejects in
    # these places.
    def check(values: Mapping[str, Any] | None, where: str) -> None:
        for key, value in (values or {}).items():
            assert isinstance(value, str), f"{where}: {key}: {value!r} should be quoted"

    for file, doc in documents:
        check(doc["metadata"].get("labels"), f"{file}: {describe(doc)} labels")
        check(doc["metadata"].get("annotations"), f"{file}: {describe(doc)} annotations")
        if doc.get("kind") == "ConfigMap":
            check(doc.get("data"), f"{file}: {describe(doc)} data")
        if doc.get("kind") == "Secret":
            check(doc.get("stringData"), f"{file}: {describe(doc)} stringData")
    for component, workload in workloads.items():
        metadata = workload["spec"]["template"].get("metadata") or {}
        check(metadata.get("labels"), f"{component}: pod labels")
        check(metadata.get("annotations"), f"{component}: pod annotations")
        for container in containers(workload):
            check(
                {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e},
                f"{component}: container {container.get('name')} env",
            )


def test_workloads_are_labelled_and_deployments_select_their_own_pods(
    workloads: dict[str, Doc],
) -> None:
    for component, workload in workloads.items():
        expected = {NAME_LABEL: NAMESPACE, COMPONENT_LABEL: component}
        labels = pod_labels(workload)
        assert expected.items() <= labels.items(), (
            f"{component}: pod labels {labels} lack {expected}"
        )
        assert workload.get("kind") == WORKLOADS[component][0], (
            f"{component} is a {workload.get('kind')}, expected {WORKLOADS[component][0]}"
        )
    deployments = {c: w for c, w in workloads.items() if w["kind"] == "Deployment"}
    for component, workload in deployments.items():
        selector = _mapping(workload["spec"].get("selector"), f"{component}.spec.selector")
        match = _mapping(selector.get("matchLabels"), f"{component} selector.matchLabels")
        assert match, f"{component}: an empty selector"
        labels = pod_labels(workload)
        assert match.items() <= labels.items(), (
            f"{component}: selector {match} does not match its pod labels {labels}; the "
            "API server rejects such a Deployment"
        )
        # Overlapping selectors make two Deployments fight over each other's pods.
        for other, other_workload in deployments.items():
            if other != component:
                assert not match.items() <= pod_labels(other_workload).items(), (
                    f"{component}'s selector {match} also selects the {other} pods"
                )


def test_env_sources_are_objects_of_this_directory(
    workloads: dict[str, Doc],
    configmaps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> None:
    for component, workload in workloads.items():
        container = main_container(workload)
        kinds = [next(iter(s)) for s in container.get("envFrom") or []]
        assert kinds.count("configMapRef") >= 1 and kinds.count("secretRef") >= 1, (
            f"{component}: envFrom {kinds} should take both the ConfigMap and the Secret"
        )
        container_env(container, configmaps, secrets)  # fails on a dangling reference


# --- settings ----------------------------------------------------------------------------


def test_metarec_variables_are_settings_the_program_reads(
    workloads: dict[str, Doc],
    configmaps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> None:
    sources: dict[str, list[str]] = {}
    for name, data in configmaps.items():
        sources[f"ConfigMap/{name}"] = list(data)
    for name, data in secrets.items():
        sources[f"Secret/{name}"] = list(data)
    for component, workload in workloads.items():
        for container in containers(workload):
            sources[f"{component} container {container.get('name')} env"] = [
                str(e["name"]) for e in container.get("env") or []
            ]
    for where, names in sources.items():
        for var in names:
            if where.startswith(("ConfigMap/", "Secret/")):
                # Every key of these goes into every metarec pod, where only METAREC_* count.
                assert var.startswith(ENV_PREFIX), f"{where}: {var} would be ignored by metarec"
            if var.startswith(ENV_PREFIX):
                assert var in KNOWN_ENV or var.startswith(KAFKA_ENV_PREFIX), (
                    f"{where}: {var} is neither a setting in metarec.config.SETTINGS nor a "
                    f"{KAFKA_ENV_PREFIX}<NAME> pass-through; metarec would refuse to start"
                )


@pytest.mark.parametrize("component", list(WORKLOADS))
def test_each_workload_starts_with_its_command_and_environment(
    workloads: dict[str, Doc],
    configmaps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
    component: str,
) -> None:
    container = main_container(workloads[component])
    argv = argv_of(container)
    namespace = parse_or_fail(argv[1:], f"{component} ({' '.join(argv)})")
    assert namespace.command == WORKLOADS[component][1], (
        f"{component} runs `metarec {namespace.command}`, expected "
        f"`metarec {WORKLOADS[component][1]}`"
    )
    env = metarec_env(container_env(container, configmaps, secrets))
    try:
        settings_from_args(namespace, environ=env)
        Settings.from_env(env)
    except ConfigError as exc:
        pytest.fail(f"{component}: metarec would refuse to start: {exc}")


def test_workloads_agree_on_what_they_share(settings: dict[str, Settings]) -> None:
    # One workload overriding, say, the events topic or the key prefix would write where
    # the others never read.
    reference = settings["consumer"]
    for component, s in settings.items():
        for field in SHARED_SETTINGS:
            assert getattr(s, field) == getattr(reference, field), (
                f"{component}'s {field} {getattr(s, field)!r} differs from the consumer's "
                f"{getattr(reference, field)!r}"
            )


def _looks_secret(var: str) -> bool:
    return var in SECRET_ENV or any(marker in var.upper() for marker in SECRET_MARKERS)


def test_secrets_are_in_the_secret_and_nowhere_else(
    workloads: dict[str, Doc],
    configmaps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> None:
    assert any("METAREC_REDIS_URL" in data for data in secrets.values()), (
        f"no Secret holds METAREC_REDIS_URL (Secrets: {sorted(secrets)})"
    )
    for name, data in configmaps.items():
        leaked = sorted(var for var in data if _looks_secret(var))
        assert not leaked, f"ConfigMap/{name} holds secret-bearing {leaked}; use the Secret"
    for component, workload in workloads.items():
        for container in containers(workload):
            for item in container.get("env") or []:
                assert not ("value" in item and _looks_secret(str(item["name"]))), (
                    f"{component}: {item['name']} is written into the pod spec; take it "
                    "from the Secret (envFrom or secretKeyRef)"
                )


def test_the_secret_is_opaque_string_data(documents: list[tuple[str, Doc]]) -> None:
    for file, doc in documents:
        if doc.get("kind") == "Secret":
            assert doc.get("type", "Opaque") == "Opaque", f"{file}: type {doc.get('type')!r}"
            assert doc.get("stringData"), f"{file}: {describe(doc)} has no stringData"


# --- probes, images, shape ---------------------------------------------------------------


def _probe_port(container: Mapping[str, Any], port: object, where: str) -> int:
    """A probe's port as a number: a name is looked up among the container's ports."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    assert port in named, f"{where}: port {port!r} is not a named port of the container"
    number = named[port]
    assert isinstance(number, int), f"{where}: containerPort {number!r} is not a number"
    return number


@pytest.mark.parametrize("component", LOOPS)
def test_probes_hit_the_health_endpoints_on_the_metrics_port(
    workloads: dict[str, Doc],
    settings: dict[str, Settings],
    component: str,
) -> None:
    container = main_container(workloads[component])
    port = settings[component].metrics_port
    assert port > 0, f"{component}: METAREC_METRICS_PORT is 0, so nothing answers the probes"
    paths = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe_name, path in paths.items():
        if probe_name == "startupProbe" and probe_name not in container:
            continue
        probe = _mapping(container.get(probe_name), f"{component}.{probe_name}")
        get = _mapping(probe.get("httpGet"), f"{component}.{probe_name}.httpGet")
        assert get.get("path") == path, (
            f"{component}: {probe_name} asks {get.get('path')!r}, metarec serves {path}"
        )
        where = f"{component}.{probe_name}"
        assert _probe_port(container, get.get("port"), where) == port, (
            f"{where}: port {get.get('port')!r} is not METAREC_METRICS_PORT {port}"
        )
    annotations = (
        workloads[component]["spec"]["template"].get("metadata", {}).get("annotations") or {}
    )
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(port), (
            f"{component}: Prometheus would scrape port {annotations['prometheus.io/port']}, "
            f"metrics are on {port}"
        )


@pytest.mark.parametrize("component", LOOPS)
def test_loops_have_a_writable_tmp_under_a_read_only_root(
    workloads: dict[str, Doc],
    component: str,
) -> None:
    container = main_container(workloads[component])
    volumes = {v.get("name"): v for v in pod_spec(workloads[component]).get("volumes") or []}
    mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts") or []}
    assert "/tmp" in mounts, f"{component}: nothing mounted on /tmp; the root is read-only"
    volume = volumes.get(mounts["/tmp"])
    assert volume is not None and "emptyDir" in volume, (
        f"{component}: /tmp should be an emptyDir volume, got {volume!r}"
    )


def test_the_consumer_image_carries_no_tensorflow_and_the_aggregator_does(
    workloads: dict[str, Doc],
) -> None:
    consumer = main_container(workloads["consumer"]).get("image")
    assert consumer == CONSUMER_IMAGE, f"consumer image {consumer!r}, expected {CONSUMER_IMAGE}"
    topics = main_container(workloads["topics"]).get("image")
    assert topics == consumer, f"the topics Job needs no TensorFlow: image {topics!r}"
    aggregator = str(main_container(workloads["aggregator"]).get("image"))
    assert aggregator != consumer and aggregator.rpartition(":")[2] in TRAIN_TAGS, (
        f"aggregator image {aggregator!r}: `metarec aggregate` trains with TensorFlow, so "
        f"it needs an image built with EXTRAS=train (tag one of {TRAIN_TAGS})"
    )


def test_only_one_aggregator_runs(workloads: dict[str, Doc]) -> None:
    spec = workloads["aggregator"]["spec"]
    # Two would split the aggregator group's partitions and each train on half the window.
    assert spec.get("replicas") == 1, f"aggregator replicas {spec.get('replicas')!r}, not 1"
    strategy = (spec.get("strategy") or {}).get("type")
    assert strategy == "Recreate", (
        f"aggregator strategy {strategy!r}: only Recreate never runs two during a rollout"
    )


def test_consumer_replicas_fit_the_events_partitions(
    workloads: dict[str, Doc],
    settings: dict[str, Settings],
) -> None:
    replicas = workloads["consumer"]["spec"].get("replicas", 1)
    # The topics Job creates the events topic, so its METAREC_PARTITIONS is the count.
    partitions = settings["topics"].partitions
    assert isinstance(replicas, int) and 1 <= replicas <= partitions, (
        f"consumer replicas {replicas!r}: a replica beyond the events topic's {partitions} "
        "partitions would sit idle"
    )


def test_pods_run_as_the_image_user_under_the_restricted_pod_security(
    workloads: dict[str, Doc],
) -> None:
    uid, gid = dockerfile_user()
    for component, workload in workloads.items():
        pod = pod_spec(workload).get("securityContext") or {}
        assert (pod.get("seccompProfile") or {}).get("type") == "RuntimeDefault", (
            f"{component}: the restricted profile needs seccompProfile RuntimeDefault"
        )
        for container in containers(workload):
            own = container.get("securityContext") or {}
            where = f"{component} container {container.get('name')}"
            # A container's own securityContext wins over the pod's, field by field.
            effective = {**pod, **own}.get
            assert effective("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
            assert effective("runAsUser") == uid, (
                f"{where}: runAsUser {effective('runAsUser')!r}, the Dockerfile's USER is {uid}"
            )
            if gid is not None and effective("runAsGroup") is not None:
                assert effective("runAsGroup") == gid, (
                    f"{where}: runAsGroup {effective('runAsGroup')!r}, the image's is {gid}"
                )
            assert own.get("allowPrivilegeEscalation") is False, (
                f"{where}: allowPrivilegeEscalation should be false"
            )
            assert own.get("readOnlyRootFilesystem") is True, (
                f"{where}: readOnlyRootFilesystem should be true"
            )
            dropped = (own.get("capabilities") or {}).get("drop") or []
            assert "ALL" in dropped, (
                f"{where}: the restricted profile needs capabilities ALL dropped"
            )


def test_the_topics_job_runs_metarec_topics_until_it_succeeds(workloads: dict[str, Doc]) -> None:
    job = workloads["topics"]
    assert argv_of(main_container(job)) == ["metarec", "topics"], argv_of(main_container(job))
    restart = pod_spec(job).get("restartPolicy")
    assert restart in ("OnFailure", "Never"), f"a Job's restartPolicy cannot be {restart!r}"
    backoff = job["spec"].get("backoffLimit")
    # Retries cover a Kafka still starting when the Job runs.
    assert isinstance(backoff, int) and backoff >= 1, f"topics Job backoffLimit {backoff!r}"


def _seconds(text: object) -> int:
    match = re.fullmatch(r"(\d+)(s|m)", str(text))
    assert match, f"unexpected duration {text!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.parametrize("component", LOOPS)
def test_shutdown_grace_matches_the_compose_deployment(
    workloads: dict[str, Doc],
    component: str,
) -> None:
    # Both give the process the time it needs to finish what is in flight after SIGTERM.
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        service = yaml.safe_load(f)["services"][COMPOSE_SERVICES[component]]
    grace = pod_spec(workloads[component]).get("terminationGracePeriodSeconds", 30)
    assert grace == _seconds(service["stop_grace_period"]), (
        f"{component}: terminationGracePeriodSeconds {grace}, docker-compose.yml's "
        f"stop_grace_period {service['stop_grace_period']}"
    )


def test_the_readme_describes_every_manifest() -> None:
    readme = (K8S_DIR / "README.md").read_text(encoding="utf-8")
    for path in manifest_files():
        assert f"`{path.name}`" in readme, f"deploy/k8s/README.md does not mention {path.name}"
