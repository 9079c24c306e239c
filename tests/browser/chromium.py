"""Debian's Chromium (`/usr/bin/chromium`) driven by Playwright for Python, headless.

Never a browser build that Playwright downloads (`playwright install`): the tests and
`make screenshot` use the distribution's package, which `.ci/run` installs when missing.
"""

from __future__ import annotations

import os

from playwright.sync_api import Browser, Playwright

__all__ = ["CHROMIUM", "launch"]

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch(playwright: Playwright) -> Browser:
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(
            f"{CHROMIUM} not found: install Debian's chromium "
            "(apt-get install -y chromium; .ci/run does it when missing)"
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
