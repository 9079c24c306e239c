"""deploy/docker-compose.yml and deploy/prometheus.yml, read offline, cross-checked
with the config the gateway service serves; and the compose file's demo upstreams
script run for real on loopback."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config.models import GatewaySettings, RedisStore
from tests.deploy.support import (
    CONTAINER_CONFIG,
    DEPLOY,
    REPO,
    dockerfile_stages,
    env_of,
    load_gateway_yaml,
    process,
    wait_http,
)
from tests.integration.harness import free_port

COMPOSE = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def compose_default(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


def volume(service: dict[str, Any], target: str) -> Path:
    """The host file a service mounts at `target` (short syntax, relative to COMPOSE)."""
    for entry in service.get("volumes", []):
        source, _, rest = entry.partition(":")
        if rest.split(":")[0] == target:
            return (COMPOSE.parent / str(source)).resolve()
    raise AssertionError(f"nothing mounted at {target}")


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host binding compose publishes it on."""
    result = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        result[int(parts[-1].split("/")[0])] = ":".join(parts[:-1])
    return result


def duration(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


@pytest.fixture(scope="module")
def served_config(services: dict[str, Any]) -> GatewaySettings:
    """The config the compose gateway serves, with the environment compose gives it."""
    gateway = services["gateway"]
    env = {k: compose_default(str(v)) for k, v in gateway["environment"].items()}
    path = volume(gateway, env["GATEWAY_CONFIG"])
    return load_gateway_yaml(path.read_text(encoding="utf-8"), str(path), **env)


def test_the_four_services(services: dict[str, Any]) -> None:
    assert set(services) == {"gateway", "upstreams", "redis", "prometheus"}


def test_gateway_is_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    for name in ("gateway", "upstreams"):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO
        assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert (context / ".dockerignore").is_file()


def test_gateway_serves_the_container_config_at_the_images_config_path(
    services: dict[str, Any],
) -> None:
    gateway = services["gateway"]
    image_path = env_of(dockerfile_stages()[-1])["GATEWAY_CONFIG"]
    assert gateway["environment"]["GATEWAY_CONFIG"] == image_path
    assert volume(gateway, image_path) == CONTAINER_CONFIG


def test_gateway_publishes_data_and_admin_ports(
    services: dict[str, Any], served_config: GatewaySettings
) -> None:
    ports = published(services["gateway"])
    assert served_config.server.port in ports
    assert served_config.server.admin_port in ports
    # The admin listener (/config, /reload) stays on the host's loopback.
    assert ports[served_config.server.admin_port].startswith("127.0.0.1")


def test_stop_grace_outlasts_the_drain(
    services: dict[str, Any], served_config: GatewaySettings
) -> None:
    assert duration(services["gateway"]["stop_grace_period"]) > served_config.server.drain_timeout


def test_upstream_targets_are_the_demo_services_ports(
    services: dict[str, Any], served_config: GatewaySettings
) -> None:
    upstreams = services["upstreams"]
    command = upstreams["command"]
    served_ports = {int(p) for p in command[command.index("--ports") + 1].split(",")}
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert volume(upstreams, upstreams["entrypoint"][-1]) == DEPLOY / "demo_upstreams.py"
    targets = [t.url for u in served_config.upstreams.values() for t in u.targets]
    assert targets
    for target in targets:
        url = urlsplit(target)
        assert url.hostname == "upstreams", target
        assert url.port in served_ports, target
    assert {"upstreams", "redis"} <= set(services["gateway"]["depends_on"])


def test_rate_limit_store_is_the_redis_service(
    services: dict[str, Any], served_config: GatewaySettings
) -> None:
    store = served_config.rate_limit_store
    assert isinstance(store, RedisStore)
    assert urlsplit(store.redis).hostname in services
    assert services["redis"]["image"].startswith("redis:")
    assert any(route.rate_limit is not None for route in served_config.routes)
    # The file alone (no compose environment) falls back to the same service.
    alone = load_gateway_yaml(CONTAINER_CONFIG.read_text(encoding="utf-8"), "container")
    assert isinstance(alone.rate_limit_store, RedisStore)
    assert urlsplit(alone.rate_limit_store.redis).hostname == "redis"
    assert alone.server.watch is True


def test_third_party_images_are_pinned(services: dict[str, Any]) -> None:
    for name in ("redis", "prometheus"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"{image}: pin a patch release"


def test_prometheus_scrapes_the_gateways_admin_port(
    services: dict[str, Any], served_config: GatewaySettings
) -> None:
    prometheus = services["prometheus"]
    config_file = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    path = volume(prometheus, config_file)
    assert path == DEPLOY / "prometheus.yml"
    scrape = yaml.safe_load(path.read_text(encoding="utf-8"))["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [
        (name, sd["port"]) for sd in job.get("dns_sd_configs", []) for name in sd["names"]
    ] + [
        (t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1]))
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    ]
    assert targets == [("gateway", served_config.server.admin_port)]


def test_demo_upstreams_serve_the_demo_apps_and_stop_on_sigterm() -> None:
    """The script the `upstreams` service runs, on free loopback ports."""
    ports = [free_port(), free_port()]
    argv = [
        sys.executable,
        str(DEPLOY / "demo_upstreams.py"),
        "--host",
        "127.0.0.1",
        "--ports",
        ",".join(map(str, ports)),
    ]
    with process(argv) as upstreams:
        for port in ports:
            assert wait_http(f"http://127.0.0.1:{port}/healthz") == 200
            assert wait_http(f"http://127.0.0.1:{port}/v1/users/1") == 200
        upstreams.send_signal(signal.SIGTERM)
        assert upstreams.wait(timeout=10) == 0
        output = upstreams.stdout.read() if upstreams.stdout else ""
    assert "demo upstreams started" in output
