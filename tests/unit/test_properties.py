"""Property tests (hypothesis): the config loader never fails with anything but a clean
`ConfigError`, and a normalised request path either is refused or, once a rewrite has
filled it in, stays inside its prefix."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from gateway.config.loader import ConfigError, load_config_text
from gateway.config.models import GatewaySettings
from gateway.dataplane.routing import CompiledTemplate, Router, normalize_path
from gateway.errors import BadRequest, GatewayError

# Hypothesis keeps a cache directory; keep it out of the work tree.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "gateway-hypothesis"))
FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ left in the work tree
    suppress_health_check=[HealthCheck.too_slow],
)

# Config documents

# Known bug (pinned by the strict xfail below): an explicit YAML tag on a scalar that
# PyYAML cannot construct crashes the loader with that constructor's own exception.
KNOWN_TAG_CRASH = re.compile(r"!(!|<tag:yaml\.org,2002:)(int|float|bool|timestamp)")


def check_config(text: str) -> None:
    assume(not KNOWN_TAG_CRASH.search(text))
    try:
        result = load_config_text(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.errors, "a ConfigError must say what is wrong"
        for line in exc.errors:
            assert isinstance(line, str) and line.startswith("fuzz.yaml:"), line
        return
    assert isinstance(result, GatewaySettings)


YAML_PIECES = st.sampled_from(
    [
        "server:",
        "upstreams:",
        "routes:",
        "  - ",
        "  ",
        "    ",
        "name: a",
        "path: /x",
        "upstream: u",
        "targets: [http://127.0.0.1:1]",
        "port: 80",
        "timeout: 2s",
        "max_body_size: 10MiB",
        "rate_limit: {rate: 1/s, burst: 1}",
        "&a ",
        "*a",
        "<<: *a",
        "!!python/object:os.system",
        "!!binary",
        "!!float",
        "!!int",
        "!!str",
        "!!seq",
        "!!map",
        "!!null",
        "!!set",
        "!custom",
        "${X}",
        "${X:-1}",
        "${",
        "[",
        "]",
        "{",
        "}",
        ":",
        "- ",
        "? ",
        "|",
        ">",
        "'",
        '"',
        "#",
        "%YAML 1.1",
        "---",
        "...",
        "\t",
        "\x00",
        "\x85",
        "\ufeff",
        "~",
        "null",
        "true",
        "1e999",
        "-1",
        "0x10",
        "\n",
    ]
)


@FAST
@given(st.text(max_size=300))
@example("server: {port: ${NOT_SET_ANYWHERE}}")
@example("routes: [{name: a, path: /x, upstream: nowhere}]")
@example("- a\n- b")
@example("a: &a [*a]")
@example("\x00")
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    check_config(text)


@FAST
@given(st.lists(YAML_PIECES, max_size=40).map("".join))
def test_yaml_shaped_noise_is_a_config_or_a_config_error(text: str) -> None:
    check_config(text)


KEYS = st.sampled_from(
    [
        "server",
        "upstreams",
        "routes",
        "auth",
        "cors",
        "rate_limit_store",
        "port",
        "host",
        "workers",
        "targets",
        "url",
        "weight",
        "name",
        "path",
        "methods",
        "upstream",
        "rewrite",
        "timeout",
        "retries",
        "attempts",
        "on",
        "budget",
        "circuit_breaker",
        "health_check",
        "aggregate",
        "backends",
        "key",
        "rate_limit",
        "rate",
        "burst",
        "api_keys",
        "jwt",
        "algorithms",
        "max_header_count",
        "header_timeout",
        "u",
        "a",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "",
            "10s",
            "250ms",
            "-1s",
            "10MiB",
            "1/s",
            "http://127.0.0.1:1",
            "ftp://x",
            "/x/{id}",
            "/x/{id:path}",
            "{",
            "GET",
            "round_robin",
            "${HOME}",
            "50%",
            "jwt",
        ]
    ),
    st.text(max_size=10),
)
DOCS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=30,
)


@FAST
@given(st.dictionaries(KEYS, DOCS, max_size=6))
def test_schema_shaped_documents_are_a_config_or_a_config_error(doc: dict[str, Any]) -> None:
    check_config(yaml.safe_dump(doc, allow_unicode=True))


# Request paths

PATH_PIECES = st.sampled_from(
    [
        "",
        ".",
        "..",
        "...",
        "%2e",
        "%2E",
        "%2e%2e",
        ".%2e",
        "%2e.",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "\\",
        "%00",
        "%25",
        "%252e",
        "%252f",
        "%",
        "%zz",
        "%2",
        "a",
        "b",
        "api",
        "v1",
        "%41",
        "%7e",
        "~",
        "-",
        "_",
        ";",
        "..;",
        ":",
        "@",
        "%40",
        "%3f",
        "%23",
        "%c0%ae",
        "%e0%80%ae",
        "%ff",
        "%C3%A9",
        "\t",
        " ",
        "\x7f",
        "é",
        "*",
        "//",
    ]
)
PATHS = st.one_of(
    st.lists(PATH_PIECES, max_size=10).map(lambda parts: "/api/" + "/".join(parts)),
    st.lists(PATH_PIECES, max_size=10).map("".join),
    st.text(max_size=40).map(lambda t: "/api/" + t),
)

ROUTER: Router[str] = Router()
ROUTER.add("api", "/api/{rest:path}", None, None)
REWRITE = CompiledTemplate("/v1/{rest}")


def segments(path: str) -> list[str]:
    return path.split("?", 1)[0].split("/")


@FAST
@given(PATHS)
@example("/api/../../etc/passwd")
@example("/api/%2e%2e/%2e%2e/admin")
@example("/api/.%2e/.%2E/x")
@example("/api/a/%2e%2e%2f..")
def test_a_path_is_refused_or_its_rewrite_stays_inside_the_prefix(raw: str) -> None:
    try:
        path = normalize_path(raw)
    except BadRequest:
        return
    assert path.startswith("/")
    assert not any(s in (".", "..") for s in segments(path)[1:-1] if True)
    assert normalize_path(path) == path, "normalising twice changes nothing"
    try:
        match = ROUTER.match("gw.test", "GET", path)
    except GatewayError:
        return  # no route: never proxied
    try:
        filled = REWRITE.fill(match.params)
    except BadRequest:
        return
    assert filled.startswith("/v1/")
    # What an upstream sees after decoding the path once: still inside /v1/.
    decoded = unquote(filled, errors="replace")
    assert decoded.startswith("/v1/")
    assert not any(s in (".", "..") for s in segments(decoded)), (raw, filled)
    assert "\\" not in decoded and "\x00" not in decoded


@pytest.mark.parametrize("raw", ["/api/%c0%ae%c0%ae/x", "/api/%e0%80%ae./x", "/api/a%c0%afb"])
def test_overlong_utf8_in_a_path_is_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


@pytest.mark.parametrize(
    "text",
    [
        "server:\n  port: !!int\n",
        "server: {port: !!int x}",
        "server: {drain_timeout: !!float .}",
        "server: {watch: !!bool maybe}",
        "a: !!timestamp 2001-02-30",
    ],
)
def test_an_explicit_tag_on_a_bad_scalar_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        load_config_text(text, "fuzz.yaml")
