"""Path normalisation, the route table and rewrite templates."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config.models import RouteSettings
from gateway.dataplane.routing import CompiledTemplate, Router, normalize_path
from gateway.errors import BadRequest, MethodNotAllowed, RouteNotFound

# --- normalize_path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/../b", "/b"),
        ("/a/b/../../c", "/c"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/..", "/"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/api/users/%2e%2e/%2e%2e/admin", "/admin"),
        ("/a/..b/c", "/a/..b/c"),  # not a dot segment
        ("/a/.hidden", "/a/.hidden"),
        ("/a//b", "/a//b"),
    ],
)
def test_dot_segments_are_resolved_raw_and_percent_encoded(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%41%62%63", "/Abc"),
        ("/a%2Db%5Fc%7E", "/a-b_c~"),
        ("/%30%39", "/09"),
        # reserved and other characters stay encoded (hex made upper case)
        ("/a%3ab", "/a%3Ab"),
        ("/a%20b", "/a%20b"),
        ("/a%3Fb", "/a%3Fb"),
        ("/a%25b", "/a%25b"),
        ("/%252e%252e/x", "/%252e%252e/x"),  # no double decoding
    ],
)
def test_unreserved_percent_encodings_are_decoded_others_kept(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/a%2Fb",
        "/a%2fb",
        "/api/users/..%2F..%2Fadmin",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/a%00b",
        "/a\x00b",
        "/a b",
        "/a\tb",
        "/a\x7fb",
    ],
)
def test_encoded_slash_backslash_nul_and_controls_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_path(raw)
    assert info.value.status == 400
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("raw", ["/a%", "/a%2", "/a%zz", "/a%g0/b", "/%%41"])
def test_malformed_percent_encoding_is_refused(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_path(raw)
    assert info.value.status == 400


@pytest.mark.parametrize("raw", ["", "a/b", "*", "http://evil/a"])
def test_a_path_must_start_with_a_slash(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


def test_normalisation_is_idempotent() -> None:
    for raw in ("/a/%2e%2e/b", "/x/./y/../z%41", "/a/b/..", "/%7euser/./p"):
        once = normalize_path(raw)
        assert normalize_path(once) == once


# --- Router ---------------------------------------------------------------------------


def _router(*entries: tuple[str, str, list[str] | None, str | None]) -> Router[str]:
    router: Router[str] = Router()
    for name, path, methods, host in entries:
        router.add(name, path, frozenset(methods) if methods else None, host)
    return router


def test_path_parameters_are_captured() -> None:
    router = _router(("users", "/api/users/{rest:path}", ["GET"], None))
    match = router.match("gw", "GET", "/api/users/42/profile")
    assert match.route == "users"
    assert match.params == {"rest": "42/profile"}
    router = _router(("one", "/items/{id}", None, None))
    assert router.match("gw", "DELETE", "/items/7").params == {"id": "7"}
    with pytest.raises(RouteNotFound):
        router.match("gw", "GET", "/items/7/more")


def test_exact_host_match_ignores_case_and_port() -> None:
    router = _router(
        ("api", "/x", None, "api.example.com"),
        ("fallback", "/x", None, None),
    )
    assert router.match("api.example.com", "GET", "/x").route == "api"
    assert router.match("API.Example.COM:8443", "GET", "/x").route == "api"
    assert router.match("other.example.com", "GET", "/x").route == "fallback"
    assert router.match("", "GET", "/x").route == "fallback"


def test_wildcard_host_matches_subdomains_only() -> None:
    router = _router(("wild", "/x", None, "*.example.com"))
    assert router.match("a.example.com", "GET", "/x").route == "wild"
    assert router.match("a.b.example.com:80", "GET", "/x").route == "wild"
    for host in ("example.com", "evil-example.com", "example.com.evil.org", "notexample.com"):
        with pytest.raises(RouteNotFound):
            router.match(host, "GET", "/x")


def test_ipv6_host_port_is_stripped() -> None:
    router = _router(("v6", "/x", None, "[::1]"))
    assert router.match("[::1]:8080", "GET", "/x").route == "v6"


def test_host_mismatch_is_not_found_not_method_not_allowed() -> None:
    router = _router(("api", "/x", ["GET"], "api.example.com"))
    with pytest.raises(RouteNotFound):
        router.match("www.example.com", "POST", "/x")


def test_first_match_wins_in_config_order() -> None:
    router = _router(
        ("specific", "/api/users/me", None, None),
        ("general", "/api/users/{rest:path}", None, None),
        ("later-specific", "/api/users/you", None, None),
    )
    assert router.match("h", "GET", "/api/users/me").route == "specific"
    assert router.match("h", "GET", "/api/users/you").route == "general"


def test_method_mismatch_falls_through_to_a_later_route() -> None:
    router = _router(
        ("reads", "/items/{id}", ["GET"], None),
        ("writes", "/items/{id}", ["PUT", "DELETE"], None),
    )
    assert router.match("h", "GET", "/items/1").route == "reads"
    assert router.match("h", "PUT", "/items/1").route == "writes"
    assert router.match("h", "DELETE", "/items/1").route == "writes"


def test_405_lists_every_allowed_method() -> None:
    router = _router(
        ("reads", "/items/{id}", ["GET", "HEAD"], None),
        ("writes", "/items/{id}", ["PUT", "DELETE", "GET"], None),
        ("other", "/other", ["POST"], None),
    )
    with pytest.raises(MethodNotAllowed) as info:
        router.match("h", "PATCH", "/items/1")
    error = info.value
    assert error.status == 405
    assert error.code == "method_not_allowed"
    allow = dict(error.headers)[b"allow"].decode()
    assert sorted(m.strip() for m in allow.split(",")) == ["DELETE", "GET", "HEAD", "PUT"]


def test_head_is_allowed_where_get_is() -> None:
    router = _router(("reads", "/r", ["GET"], None), ("writes", "/w", ["POST"], None))
    assert router.match("h", "HEAD", "/r").route == "reads"
    with pytest.raises(MethodNotAllowed):
        router.match("h", "HEAD", "/w")


def test_no_methods_means_every_method() -> None:
    router = _router(("any", "/a", None, None))
    for method in ("GET", "POST", "PATCH", "OPTIONS", "DELETE"):
        assert router.match("h", method, "/a").route == "any"


def test_unknown_path_is_404() -> None:
    router = _router(("users", "/api/users/{rest:path}", None, None))
    with pytest.raises(RouteNotFound) as info:
        router.match("h", "GET", "/api/orders/1")
    assert info.value.status == 404
    assert info.value.code == "route_not_found"
    with pytest.raises(RouteNotFound):
        _router().match("h", "GET", "/")


def test_router_len_and_repr() -> None:
    router = _router(("a", "/a", None, None), ("b", "/b", None, None))
    assert len(router) == 2
    assert "2 routes" in repr(router)


# --- CompiledTemplate -----------------------------------------------------------------


def test_fill_with_rest_parameter() -> None:
    template = CompiledTemplate("/v1/users/{rest}")
    assert template.fill({"rest": "42/profile"}) == "/v1/users/42/profile"
    assert template.fill({"rest": ""}) == "/v1/users/"
    assert template.fill({"rest": "a%20b/c%3F"}) == "/v1/users/a%20b/c%3F"


def test_fill_with_typed_and_several_parameters() -> None:
    template = CompiledTemplate("/v2/{tenant}/files/{rest:path}/raw")
    assert template.fill({"tenant": "acme", "rest": "a/b.txt"}) == "/v2/acme/files/a/b.txt/raw"
    assert CompiledTemplate("/static").fill({"unused": "x"}) == "/static"
    assert CompiledTemplate("/x{name}.json").fill({"name": "abc"}) == "/xabc.json"


@pytest.mark.parametrize(
    ("template", "params"),
    [
        ("/v1/{name}", {"name": ".."}),
        ("/v1/{name}", {"name": "."}),
        ("/v1/{name}/tail", {"name": ".."}),
        ("/v1/{rest}", {"rest": "a/../../admin"}),
        ("/v1/{rest}", {"rest": "./x"}),
    ],
)
def test_fill_refuses_to_create_a_dot_segment(template: str, params: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        CompiledTemplate(template).fill(params)


def test_partial_segment_dots_are_not_dot_segments() -> None:
    # `/x{name}` with `..` gives the segment `x..`, which is a plain name
    assert CompiledTemplate("/v1/x{name}").fill({"name": ".."}) == "/v1/x.."
    assert CompiledTemplate("/v1/{name}.bak").fill({"name": "."}) == "/v1/..bak"


def test_partial_segment_route_cannot_smuggle_dots_through_a_rewrite() -> None:
    # The route's path captures `..` from a partial segment; the rewrite puts it in a
    # segment of its own: the gateway must refuse rather than climb out of /v1/.
    router = _router(("files", "/files/x{name}", None, None))
    params = router.match("h", "GET", normalize_path("/files/x..")).params
    assert params == {"name": ".."}
    with pytest.raises(BadRequest):
        CompiledTemplate("/v1/{name}").fill(params)


# --- rewrite templates as the config accepts them -------------------------------------


def test_a_rewrite_over_undefined_parameters_is_refused() -> None:
    with pytest.raises(ValidationError, match="does not define"):
        RouteSettings(name="r", path="/c/{rest:path}", upstream="u", rewrite="/v1/{other}")


@pytest.mark.parametrize("rewrite", ["v1/{rest}", "{rest}"])
def test_a_rewrite_must_be_an_absolute_path(rewrite: str) -> None:
    with pytest.raises(ValidationError):
        RouteSettings(name="r", path="/c/{rest:path}", upstream="u", rewrite=rewrite)
