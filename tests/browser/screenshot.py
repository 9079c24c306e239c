"""`make screenshot`: the status page of the demo (`make run`'s config and upstreams) under
a little traffic, captured by Debian's headless Chromium into a PNG for docs/operations.md.

The demo runs on free ports (the config is copied with its ports replaced), with health
checks switched on so the page has health to show; everything else is the demo's.

    python -m tests.browser.screenshot assets/status.png
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml
from playwright.sync_api import expect, sync_playwright

from tests.browser.chromium import launch
from tests.integration.harness import free_port

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"
DEMO_PORTS = (9001, 9002, 9003, 9004)


def demo_config(ports: list[int], port: int, admin_port: int) -> str:
    text = DEMO_CONFIG.read_text()
    for old, new in zip(DEMO_PORTS, ports, strict=True):
        text = re.sub(rf"127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", text)
    config = yaml.safe_load(text)
    for upstream in config["upstreams"].values():
        retries = upstream.get("retries", {})
        if True in retries:  # YAML 1.1 reads the key `on` as true; the gateway's loader does not
            retries["on"] = retries.pop(True)
    config["server"].update(port=port, admin_port=admin_port, access_log=False)
    for upstream in config["upstreams"].values():
        upstream["health_check"] = {"interval": "1s"}
    return yaml.safe_dump(config, sort_keys=False)


def traffic(base: str, until: float) -> None:
    """Something for every kind of figure: successes, fan-out, timeouts, unknown paths."""
    rng = random.Random(7)
    paths = ["/api/users/1", "/api/users", "/api/orders?user=1", "/api/profile/1", "/api/echo/hi"]
    with httpx.Client(base_url=base, timeout=5) as client:
        while time.monotonic() < until:
            for _ in range(rng.randint(5, 25)):
                client.get(rng.choice(paths))
            if rng.random() < 0.3:
                client.get("/api/slow?ms=1200")  # the route's 1 s deadline: 504
            if rng.random() < 0.3:
                client.get("/api/users/3")  # the upstream's own 404
            if rng.random() < 0.2:
                client.get("/favicon.ico")  # no route: 404 from the gateway
            time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic before the shot")
    args = parser.parse_args(argv)
    ports = [free_port() for _ in DEMO_PORTS]
    port, admin_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-screenshot-") as tmp:
        config = Path(tmp) / "gateway.yaml"
        config.write_text(demo_config(ports, port, admin_port))
        env = {k: v for k, v in os.environ.items() if k != "ORDERS_URL"}
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.demo",
                "--config",
                str(config),
                "--ports",
                ",".join(map(str, ports)),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            admin = f"http://127.0.0.1:{admin_port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(admin + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if demo.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the demo did not start")
                time.sleep(0.1)
            until = time.monotonic() + args.seconds
            load = threading.Thread(target=traffic, args=(f"http://127.0.0.1:{port}", until))
            load.start()
            with sync_playwright() as playwright:
                browser = launch(playwright)
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(admin + "/status")
                expect(page.locator("#state")).to_have_text("live", timeout=10_000)
                load.join()
                time.sleep(1.5)  # one more poll after the last request
                args.output.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.output), full_page=True)
                browser.close()
        finally:
            demo.terminate()
            demo.wait(timeout=15)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
