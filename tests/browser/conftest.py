from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser.chromium import launch


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module (starting it is the slow part)."""
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()
