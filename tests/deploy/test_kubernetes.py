"""deploy/kubernetes: every manifest validated offline against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict: unknown fields are errors), and the parts that
must agree with the gateway checked against its real defaults and its own loader."""

from __future__ import annotations

import copy
import posixpath
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config.models import GatewaySettings, RedisStore, ServerSettings
from tests.deploy.support import (
    KUBERNETES,
    configmap_gateway_yaml,
    container,
    container_port,
    dockerfile_stages,
    env_of,
    find,
    kustomization,
    load_gateway_yaml,
    manifests,
    quantity,
)

# The oldest release these manifests claim (autoscaling/v2 and policy/v1 are GA long
# before it), and a recent one; kubernetes-validate ships the schemas of both.
KUBERNETES_VERSIONS = ["1.27.0", "1.33.0"]


@pytest.fixture(scope="module")
def config() -> GatewaySettings:
    return load_gateway_yaml(configmap_gateway_yaml(), "configmap.yaml:gateway.yaml")


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return find("Deployment", "gateway")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


@pytest.fixture(scope="module")
def gateway(deployment: dict[str, Any]) -> dict[str, Any]:
    return container(deployment, "gateway")


def prestop_sleep(c: dict[str, Any]) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


# --- schemas ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_in_the_directory() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in manifests())
    assert kinds == [
        ("ConfigMap", "gateway-config"),
        ("Deployment", "gateway"),
        ("Deployment", "gateway-redis"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Service", "gateway"),
        ("Service", "gateway-redis"),
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name, doc", manifests(), ids=[f"{n}:{d['kind']}" for n, d in manifests()])
def test_manifest_is_valid_for_kubernetes(name: str, doc: dict[str, Any], version: str) -> None:
    validated = kubernetes_validate.validate(doc, version, strict=True)
    assert validated == version.rsplit(".", 1)[0]  # its own schemas, not an older set


def test_strict_validation_rejects_what_the_api_server_would(deployment: dict[str, Any]) -> None:
    """The validator is not a rubber stamp: a misspelt field and a wrong type fail."""
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_renders_valid_manifests_with_the_image_and_labels(tmp_path: Path) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert len(docs) == len(manifests())
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gateway"
    (image,) = kustomization()["images"]
    (rendered_deployment,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway"
    ]
    assert container(rendered_deployment, "gateway")["image"] == (
        f"{image['newName']}:{image['newTag']}"
    )
    # Selectors are left alone (includeSelectors: false): they are immutable in place.
    assert (
        rendered_deployment["spec"]["selector"] == find("Deployment", "gateway")["spec"]["selector"]
    )


# --- the gateway's config --------------------------------------------------------------


def test_configmap_config_loads_and_is_watched(config: GatewaySettings) -> None:
    assert config.server.watch is True, "the gateway reloads the ConfigMap when it changes"
    assert isinstance(config.rate_limit_store, RedisStore), "replicas share one budget"
    assert any(route.rate_limit is not None for route in config.routes)
    assert config.server.workers == 1


def test_admin_listener_is_reachable_by_the_kubelet(config: GatewaySettings) -> None:
    # The default admin_host is loopback-only, which probes from the kubelet (and
    # Prometheus) cannot reach: the container's config must override it.
    assert ServerSettings().admin_host == "127.0.0.1"
    assert config.server.admin_host == "0.0.0.0"
    assert config.server.host == "0.0.0.0"


def test_probes_use_the_admin_port_and_paths_of_the_gateway(
    config: GatewaySettings, gateway: dict[str, Any]
) -> None:
    readiness, liveness = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert container_port(gateway, readiness["port"]) == config.server.admin_port
    assert container_port(gateway, liveness["port"]) == config.server.admin_port
    # The defaults and the ConfigMap agree, so a config without admin_port works too.
    assert config.server.admin_port == ServerSettings().admin_port == 9901
    assert gateway["readinessProbe"].get("scheme", "HTTP") == "HTTP"


def test_service_and_ports_reach_the_data_plane(
    config: GatewaySettings, gateway: dict[str, Any], deployment: dict[str, Any]
) -> None:
    service = find("Service", "gateway")
    (http,) = service["spec"]["ports"]
    assert container_port(gateway, http["targetPort"]) == config.server.port
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.server.admin_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_termination_grace_outlasts_prestop_plus_drain(
    config: GatewaySettings, pod: dict[str, Any], gateway: dict[str, Any]
) -> None:
    pause = prestop_sleep(gateway)
    assert pause >= 1, "a pause for the endpoints change to reach the load balancers"
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_timeout + pause
    # Also with the gateway's default drain_timeout, should the key be removed.
    assert pod["terminationGracePeriodSeconds"] > ServerSettings().drain_timeout + pause
    # `sleep` must exist in the image: the runtime stage is Debian slim (coreutils).
    assert "slim" in dockerfile_stages()[-1].image


def test_config_is_mounted_as_a_directory_so_updates_propagate(
    pod: dict[str, Any], gateway: dict[str, Any]
) -> None:
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    config_path = env["GATEWAY_CONFIG"]
    assert config_path == env_of(dockerfile_stages()[-1])["GATEWAY_CONFIG"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == find("ConfigMap", "gateway-config")["metadata"]["name"]
    assert "items" not in volume["configMap"]
    (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert mount["mountPath"] == posixpath.dirname(config_path)
    assert posixpath.basename(config_path) in find("ConfigMap", "gateway-config")["data"]
    assert mount.get("readOnly") is True


def test_replicas_resources_and_rollout(
    deployment: dict[str, Any], gateway: dict[str, Any]
) -> None:
    assert deployment["spec"]["replicas"] == 3
    resources = gateway["resources"]
    for kind in ("cpu", "memory"):
        request, limit = resources["requests"][kind], resources["limits"][kind]
        assert 0 < quantity(request) <= quantity(limit), kind
    # One worker process per pod uses one core at most: request a whole one.
    assert quantity(resources["requests"]["cpu"]) == 1
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


@pytest.mark.parametrize("name", ["gateway", "gateway-redis"])
def test_pods_run_locked_down(name: str) -> None:
    deployment = find("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        assert security.get("privileged", False) is False
        assert {"requests", "limits"} <= set(c["resources"])
        assert not c["image"].endswith(":latest") and ":" in c["image"]


def test_pod_user_is_the_images_user(pod: dict[str, Any]) -> None:
    user = dockerfile_stages()[-1].last("USER")
    assert user is not None
    uid, _, gid = user.args.partition(":")
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid or uid)


def test_tmp_is_a_writable_emptydir(pod: dict[str, Any], gateway: dict[str, Any]) -> None:
    (mount,) = [m for m in gateway["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    assert not mount.get("readOnly", False)


def test_hpa_and_pdb_target_the_gateway(deployment: dict[str, Any]) -> None:
    hpa, pdb = find("HorizontalPodAutoscaler", "gateway"), find("PodDisruptionBudget", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The budget must allow a node drain at the minimum size, or drains block forever.
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] >= 1
    else:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_redis_store_of_the_config_is_the_redis_service(config: GatewaySettings) -> None:
    store = config.rate_limit_store
    assert isinstance(store, RedisStore)
    url = urlsplit(store.redis)
    service = find("Service", url.hostname or "")
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == (url.port or 6379)]
    redis_deployment = find("Deployment", "gateway-redis")
    redis = container(redis_deployment, "redis")
    assert container_port(redis, port["targetPort"]) == 6379
    labels = redis_deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # Budgets only: nothing is persisted, and memory is bounded below the limit.
    args = redis["args"]
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    maxmemory = quantity(args[args.index("--maxmemory") + 1].replace("mb", "M"))
    assert maxmemory < quantity(redis["resources"]["limits"]["memory"])
