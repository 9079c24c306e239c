"""`gateway run --workers 2`: one shared data port, one admin listener, metrics summed
across workers, a dead worker restarted, reload fanned out, SIGTERM drains every worker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import GatewayProcess, UpstreamServer

WORKERS = ["--workers", "2"]


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    if path.endswith("/slow"):
        await asyncio.sleep(1.5)
    body = f"upstream saw {path}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def config(up: UpstreamServer, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {"up": {"targets": [up.url]}},
        "routes": [{"name": "r", "path": "/r/{rest:path}", "upstream": "up"}],
    }


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


def handles(pid: int, *signals: int) -> bool:
    """Whether the process has installed its own handlers for `signals` (SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    match = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    assert match is not None
    caught = int(match[1], 16)
    return all(caught & (1 << (s - 1)) for s in signals)


def workers(gw: GatewayProcess, count: int = 2, timeout: float = 10.0) -> set[int]:
    """The worker pids, once there are `count` of them and each has installed its signal
    handlers (the supervisor's /readyz waits for them too)."""
    assert gw.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        pids = children(gw.proc.pid)
        ready = len(pids) == count and all(
            handles(pid, signal.SIGHUP, signal.SIGTERM) for pid in pids
        )
        if ready or time.monotonic() > deadline:
            assert ready, f"workers {pids} not up after {timeout}s: {gw.stderr}"
            return pids
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_and_wait_for_replacement(gw: GatewayProcess, victim: int) -> set[int]:
    """SIGKILL one worker; return the worker pids once its replacement is up."""
    assert gw.proc is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while victim in children(gw.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim not in children(gw.proc.pid), "the dead worker was not reaped"
    pids = workers(gw, timeout=5)  # two again, each with its signal handlers: restarted
    assert victim not in pids
    return pids


def listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def holds(pid: int, inodes: set[str]) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def total_requests(gw: GatewayProcess) -> float:
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_requests_total"
    )


def wait_total(gw: GatewayProcess, expected: float, timeout: float = 3.0) -> float:
    """Counters are bumped right after the response is sent: poll until they settle."""
    deadline = time.monotonic() + timeout
    while True:
        total = total_requests(gw)
        if total >= expected or time.monotonic() > deadline:
            time.sleep(0.2)  # and nothing more arrives
            return total_requests(gw)
        time.sleep(0.05)


def served_by(pid: int) -> bool:
    """Whether the worker wrote request counters (it has served at least one request)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    assert found, "the worker runs without PROMETHEUS_MULTIPROC_DIR"
    directory = Path(found[0].split(b"=", 1)[1].decode())
    return (directory / f"counter_{pid}.db").exists()


def fresh_get(url: str) -> httpx.Response:
    with httpx.Client(timeout=10) as client:  # a new connection each time
        return client.get(url)


def test_two_workers_share_one_data_port_behind_one_admin_listener(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    assert gw.proc is not None
    pids = workers(gw)
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"gateway.server.supervisor" in cmdline
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).status_code == 200
    for i in range(10):
        r = fresh_get(f"{gw.url}/r/{i}")
        assert r.status_code == 200
        assert r.text == f"upstream saw /r/{i}"

    data, admin = listening_inodes(gw.port), listening_inodes(gw.admin_port)
    assert len(data) == 1, "the data port is bound more than once"
    assert len(admin) == 1
    assert all(holds(pid, data) for pid in pids), "a worker does not accept on the data port"
    assert holds(gw.proc.pid, admin)
    assert not any(holds(pid, admin) for pid in pids), "a worker runs an admin listener"


def test_metrics_are_summed_across_workers_and_survive_a_worker_death(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    assert gw.proc is not None
    pids = workers(gw)

    sent = 0
    while sent < 40 or (not all(served_by(pid) for pid in pids) and sent < 200):
        for _ in range(10):
            assert fresh_get(f"{gw.url}/r/{sent}").status_code == 200
            sent += 1
    assert all(served_by(pid) for pid in pids), "one worker served every request"
    assert wait_total(gw, sent) == sent

    victim = min(pids)
    now = kill_and_wait_for_replacement(gw, victim)
    (replacement,) = now - pids
    assert alive(replacement)

    for i in range(10):
        assert fresh_get(f"{gw.url}/r/after-{i}").status_code == 200
    # The dead worker's counts are kept and nothing is counted twice.
    assert wait_total(gw, sent + 10) == sent + 10
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize("how", ["POST /reload", "SIGHUP"])
def test_reload_reaches_every_worker(
    how: str, upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    pids = workers(gw)
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["routes"].append({"name": "new", "path": "/new", "upstream": "up"})
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if how == "SIGHUP":
        gw.signal(signal.SIGHUP)
    else:
        assert httpx.post(gw.admin_url + "/reload", timeout=10).status_code == 200

    # Every worker must take the new route: 20 fresh connections in a row all see it.
    deadline = time.monotonic() + 3
    streak = 0
    while streak < 20 and time.monotonic() < deadline:
        streak = streak + 1 if fresh_get(gw.url + "/new").status_code == 200 else 0
    assert streak == 20
    assert workers(gw) == pids, "a worker was restarted instead of reloaded"
    names = [r["name"] for r in httpx.get(gw.admin_url + "/config", timeout=5).json()["routes"]]
    assert names == ["r", "new"]


def test_bad_reload_is_refused_by_the_supervisor(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    pids = workers(gw)
    gw.config_path.write_text(gw.config_path.read_text() + "bogus: 1\n")
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 400
    assert any("bogus" in line for line in r.json()["errors"])
    for i in range(6):
        assert fresh_get(f"{gw.url}/r/{i}").status_code == 200
    assert workers(gw) == pids


def test_supervisor_refuses_and_counts_a_reload_to_an_unsupported_feature(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    pids = workers(gw)
    cfg = yaml.safe_load(gw.config_path.read_text())
    # A route asking for API keys while no keys are configured: refused, not served open.
    cfg["routes"].append({"name": "new", "path": "/new", "upstream": "up", "auth": "api_key"})
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = httpx.post(gw.admin_url + "/reload", timeout=10)
    assert r.status_code == 400
    assert any("auth.api_keys" in line for line in r.json()["errors"])
    assert fresh_get(gw.url + "/new").status_code == 404
    assert workers(gw) == pids
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    refused = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_config_reloads_total" and s.labels["result"] == "error"
    ]
    assert refused == [1.0]


async def test_sigterm_to_the_supervisor_drains_every_worker_and_exits_zero(
    upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    pids = workers(gw)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        # Several connections at once, so that both workers likely hold one.
        in_flight = [asyncio.create_task(client.get(f"/r/{i}/slow")) for i in range(6)]
        await asyncio.sleep(0.3)
        gw.signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=3) as probe:
            ready = await probe.get(gw.admin_url + "/readyz")
        assert ready.status_code == 503
        responses = await asyncio.gather(*in_flight)
    assert [r.status_code for r in responses] == [200] * 6
    assert sorted(r.text for r in responses) == sorted(
        f"upstream saw /r/{i}/slow" for i in range(6)
    )
    code = await asyncio.to_thread(gw.wait, 10)
    assert code == 0, gw.stderr
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_as_soon_as_ready_is_handled_by_every_worker(
    sig: signal.Signals,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)  # returns once /readyz is 200
    assert gw.proc is not None
    pids = children(gw.proc.pid)
    assert len(pids) == 2
    gw.signal(sig)
    if sig == signal.SIGTERM:
        assert gw.wait(10) == 0, gw.stderr
        return
    # A reload: the same workers carry on, none is killed and restarted.
    assert workers(gw) == pids
    assert "worker died" not in gw.stderr


@pytest.mark.parametrize("edit", ["broken-file", "edited-file"])
def test_a_restarted_worker_serves_the_running_config_not_the_file(
    edit: str, upstream: Callable[..., UpstreamServer], gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    assert gw.proc is not None
    pids = workers(gw)
    if edit == "broken-file":
        gw.config_path.write_text("routes: [\n")
    else:
        cfg = yaml.safe_load(gw.config_path.read_text())
        cfg["routes"].append({"name": "new", "path": "/new", "upstream": "up"})
        gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # No reload was asked for. A worker dies (an OOM kill, a crash) and is replaced.
    replacement_pids = kill_and_wait_for_replacement(gw, min(pids))
    time.sleep(1.5)  # a replacement that cannot load the file would have died by now
    assert children(gw.proc.pid) == replacement_pids, "the worker is in a restart loop"
    # Every worker serves the running config: /r/... exists, /new does not.
    for i in range(12):
        assert fresh_get(f"{gw.url}/r/{i}").status_code == 200
        assert fresh_get(f"{gw.url}/new").status_code == 404


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_to_the_whole_process_group_still_drains(
    sig: signal.Signals,
    upstream: Callable[..., UpstreamServer],
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(config(upstream(backend)), args=WORKERS)
    assert gw.proc is not None
    pids = workers(gw)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        in_flight = [asyncio.create_task(client.get(f"/r/{i}/slow")) for i in range(4)]
        await asyncio.sleep(0.4)
        # What the kernel does for a terminal's Ctrl-C, and systemd on `stop`: the
        # signal goes to every process of the group (here: not to pytest's own group).
        # The workers get theirs a moment first, so that no two signals coalesce.
        for pid in pids:
            os.kill(pid, sig)
        await asyncio.sleep(0.2)
        os.kill(gw.proc.pid, sig)
        responses = await asyncio.gather(*in_flight, return_exceptions=True)
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    assert statuses == [200] * 4
    assert await asyncio.to_thread(gw.wait, 10) == 0
