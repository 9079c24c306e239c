"""The config loader: YAML positions, `${VAR}` interpolation, env overrides, every error at once."""

# ruff: noqa: E501  (EXAMPLE is the contract's file verbatim, long lines and all)

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from gateway.config.loader import (
    ConfigError,
    cross_check,
    load_config,
    load_config_text,
    resolve_config_path,
    route_table,
)
from gateway.config.models import GatewaySettings, RedisStore

# A verbatim copy of the contract's gateway.example.yaml (the spec directory is not
# shipped with the repository, so the tests must not read it from there).
EXAMPLE = """\
# Every key of the gateway's schema, with its default where it has one.
# CONTRACT.md beside this file says what each one means.

server:
  host: 0.0.0.0
  port: 8080
  workers: 1
  admin_host: 127.0.0.1
  admin_port: 9901
  max_body_size: 10MiB
  drain_timeout: 30s
  trusted_proxies: [127.0.0.1/32]
  access_log: true
  log_level: info
  watch: false                      # true: reload when this file changes (Kubernetes ConfigMaps)
  admin_token_env: GATEWAY_ADMIN_TOKEN   # optional; unset leaves the admin paths open

rate_limit_store: memory            # or: {redis: "redis://127.0.0.1:6379/0"}

auth:
  api_keys:
    header: X-API-Key
    keys_env: GATEWAY_API_KEYS      # comma-separated
  jwt:
    issuer: https://issuer.example
    audience: orders-api
    algorithms: [RS256]
    jwks_file: config/jwks.json

cors:
  allow_origins: ["https://app.example"]
  allow_methods: [GET, POST]
  allow_headers: [Authorization, Content-Type]
  max_age: 10m

upstreams:
  users:
    targets:
      - http://127.0.0.1:9001
      - {url: "http://127.0.0.1:9002", weight: 2}
    balancer: round_robin           # round_robin | least_inflight | random
    max_connections: 200
    max_keepalive: 100
    keepalive_expiry: 30s
    max_concurrency: 100
    max_queue: 200
    queue_timeout: 100ms
    connect_timeout: 1s
    read_timeout: 10s
    retries:
      attempts: 2                   # tries after the first
      backoff: 25ms                 # doubled each try, with jitter
      on: [connect_error, 502, 503, 504]
      budget: 20%                   # retries at most this share of requests
    circuit_breaker:
      failure_ratio: 0.5
      min_requests: 20
      window: 10s
      open_for: 5s
    health_check:
      path: /healthz
      interval: 5s
      timeout: 1s
      healthy_threshold: 2
      unhealthy_threshold: 3
  orders:
    targets: ["${ORDERS_URL:-http://127.0.0.1:9003}"]
    max_concurrency: 50
  recommendations:
    targets: [http://127.0.0.1:9004]
    max_concurrency: 20
    read_timeout: 300ms

routes:
  - name: users
    path: /api/users/{rest:path}
    methods: [GET, POST, PUT, DELETE]
    upstream: users
    rewrite: /v1/users/{rest}
    timeout: 2s
    rate_limit: {rate: 100/s, burst: 200, key: client_ip}

  - name: orders
    path: /api/orders/{rest:path}
    upstream: orders
    auth: jwt
    timeout: 3s

  - name: profile
    path: /api/profile/{user_id}
    methods: [GET]
    timeout: 800ms
    auth: api_key
    aggregate:
      partial: allow
      backends:
        - {upstream: users, path: "/v1/users/{user_id}", key: user, required: true, fields: [id, name]}
        - {upstream: orders, path: "/orders?user={user_id}", key: orders}
        - {upstream: recommendations, path: "/recs/{user_id}", key: recommendations, timeout: 300ms}

  - name: chat
    path: /ws/chat
    upstream: users                 # WebSocket upgrades are proxied
"""

EXAMPLE_TABLE = """\
NAME     METHODS              HOST  PATH                     TARGET
users    GET,POST,PUT,DELETE  *     /api/users/{rest:path}   users -> /v1/users/{rest}
orders   *                    *     /api/orders/{rest:path}  orders -> /api/orders/{rest:path}
profile  GET                  *     /api/profile/{user_id}   aggregate(users, orders, recommendations)
chat     *                    *     /ws/chat                 users -> /ws/chat"""

GOOD = """\
server:
  port: 8000
upstreams:
  api:
    targets: [http://10.0.0.1:80, http://10.0.0.2:80]
routes:
  - name: api
    path: /api/{rest:path}
    host: api.example
    upstream: api
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GATEWAY_* variable in the developer's shell would override what the tests write.
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_") or name in (
            "ORDERS_URL",
            "PORT",
            "TEST_HOST",
            "LOG",
            "X",
        ):
            monkeypatch.delenv(name)


def load(text: str) -> GatewaySettings:
    return load_config_text(textwrap.dedent(text), "cfg.yaml")


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value.errors


# --- files that load ---------------------------------------------------------------


def test_good_file_loads_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD)

    settings = load_config(str(path))

    assert settings.server.port == 8000
    assert settings.server.host == "0.0.0.0"  # a default
    assert [t.url for t in settings.upstreams["api"].targets] == [
        "http://10.0.0.1:80",
        "http://10.0.0.2:80",
    ]
    assert settings.routes[0].host == "api.example"


def test_contract_example_loads() -> None:
    settings = load_config_text(EXAMPLE, "gateway.example.yaml")

    assert [r.name for r in settings.routes] == ["users", "orders", "profile", "chat"]
    assert sorted(settings.upstreams) == ["orders", "recommendations", "users"]
    users = settings.upstreams["users"]
    assert [(t.url, t.weight) for t in users.targets] == [
        ("http://127.0.0.1:9001", 1),
        ("http://127.0.0.1:9002", 2),
    ]
    # `on:` is YAML 1.1's boolean true; the loader must keep it as the key "on".
    assert users.retries.on == ("connect_error", 502, 503, 504)
    assert users.retries.budget == pytest.approx(0.2)
    assert users.circuit_breaker is not None and users.circuit_breaker.open_for == 5.0
    assert settings.upstreams["orders"].targets[0].url == "http://127.0.0.1:9003"
    assert settings.server.admin_token_env == "GATEWAY_ADMIN_TOKEN"
    assert settings.auth is not None and settings.auth.jwt is not None
    assert settings.cors is not None and settings.cors.max_age == 600.0
    profile = settings.routes[2]
    assert profile.aggregate is not None
    assert [b.key for b in profile.aggregate.backends] == ["user", "orders", "recommendations"]


def test_contract_example_route_table() -> None:
    assert route_table(load_config_text(EXAMPLE, "x.yaml")) == EXAMPLE_TABLE


def test_route_table_of_no_routes_is_the_header() -> None:
    assert route_table(load("")) == "NAME  METHODS  HOST  PATH  TARGET"


def test_empty_file_is_all_defaults() -> None:
    assert load("") == GatewaySettings()
    assert load("# nothing but a comment\n").server.port == 8080


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("3", 3.0), ("0.5", 0.5)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    settings = load(f"server:\n  drain_timeout: {text}\n")
    assert settings.server.drain_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"), [("512", 512), ("64KiB", 64 * 1024), ("10MiB", 10 * 1024 * 1024)]
)
def test_sizes_parse(text: str, size: int) -> None:
    assert load(f"server:\n  max_body_size: {text}\n").server.max_body_size == size


@pytest.mark.parametrize(("text", "per_second"), [("100/s", 100.0), ("6000/m", 100.0)])
def test_rates_parse(text: str, per_second: float) -> None:
    settings = load(f"""\
        upstreams: {{u: {{targets: [http://a:1]}}}}
        routes:
          - {{name: r, path: /, upstream: u, rate_limit: {{rate: {text}, burst: 1}}}}
        """)
    rate_limit = settings.routes[0].rate_limit
    assert rate_limit is not None and rate_limit.rate == pytest.approx(per_second)


def test_merge_keys_share_settings() -> None:
    settings = load("""\
        upstreams:
          a: &common
            targets: [http://a:1]
            max_concurrency: 7
          b:
            <<: *common
            targets: [http://b:1]
        """)
    assert settings.upstreams["b"].max_concurrency == 7
    assert settings.upstreams["b"].targets[0].url == "http://b:1"


# --- errors, with positions ----------------------------------------------------------


def test_unknown_key_points_at_the_key() -> None:
    assert errors_of("""\
        # a comment
        server:
            prot: 8080
        """) == ["cfg.yaml:3:5: server.prot: Extra inputs are not permitted"]


def test_unknown_key_in_a_list_item_names_its_index() -> None:
    assert errors_of("""\
        upstreams:
          users:
            targets:
              - http://a:1
              - {url: "http://b:1", wieght: 2}
        """) == ["cfg.yaml:5:29: upstreams.users.targets.1.wieght: Extra inputs are not permitted"]


def test_unknown_top_level_key() -> None:
    assert errors_of("server: {}\nroute: []\n") == [
        "cfg.yaml:2:1: route: Extra inputs are not permitted"
    ]


def test_underscore_keys_never_reach_pydantic_settings() -> None:
    # BaseSettings would read `_env_file` as an option of its own.
    assert errors_of("_env_file: /etc/passwd\n") == [
        "cfg.yaml:1:1: _env_file: Extra inputs are not permitted"
    ]


def test_every_error_in_a_file_is_reported_at_once() -> None:
    assert errors_of("""\
        server:
          port: 70000
          max_body_size: lots
          log_level: loud
        upstreams:
          users:
            targets: [ftp://users]
            max_queue: -1
        routes:
          - name: users
            upstream: users
          - name: orders
            path: orders
            upstream: users
        """) == [
        "cfg.yaml:2:9: server.port: Input should be less than or equal to 65535",
        "cfg.yaml:3:18: server.max_body_size: invalid size 'lots': expected e.g. 512, 64KiB, 10MiB",
        "cfg.yaml:4:14: server.log_level: "
        "Input should be 'debug', 'info', 'warning', 'error' or 'critical'",
        "cfg.yaml:7:15: upstreams.users.targets.0.url: "
        "invalid target URL 'ftp://users': expected http(s)://host:port with no path",
        "cfg.yaml:8:16: upstreams.users.max_queue: Input should be greater than or equal to 0",
        # A missing field points at the mapping that lacks it.
        "cfg.yaml:10:5: routes.0.path: Field required",
        "cfg.yaml:13:11: routes.1.path: a route path must start with /",
    ]


def test_errors_are_in_file_order_whatever_found_them() -> None:
    # The `${...}` problem is found while reading, before validation finds line 2's.
    assert errors_of("""\
        server:
          port: -1
          host: ${TEST_HOST}
        """) == [
        "cfg.yaml:2:9: server.port: Input should be greater than or equal to 0",
        "cfg.yaml:3:9: server.host: environment variable TEST_HOST is not set "
        "(write ${TEST_HOST:-default} to give a default)",
    ]


def test_union_errors_keep_the_branch_that_fits() -> None:
    assert errors_of("rate_limit_store: {redis: localhost}\n") == [
        "cfg.yaml:1:27: rate_limit_store.redis: expected a redis:// URL"
    ]


def test_union_errors_that_fit_no_branch_become_one_line() -> None:
    errors = errors_of("""\
        upstreams:
          u:
            targets: [http://a:1]
            retries: {on: [connect_error, 404]}
        """)
    assert errors == [
        "cfg.yaml:4:35: upstreams.u.retries.on.1: Input should be 'connect_error', 'timeout', "
        "'unavailable', 'resource-exhausted', 'deadline-exceeded' or 'internal', "
        "or Input should be greater than or equal to 500"
    ]


def test_unknown_upstream_and_duplicate_route_names() -> None:
    assert errors_of("""\
        upstreams:
          users: {targets: [http://a:1]}
          orders: {targets: [http://b:1]}
        routes:
          - name: users
            path: /users
            upstream: user
          - name: users
            path: /profile
            aggregate:
              backends:
                - {upstream: users, path: /u}
                - {upstream: order, path: /o}
        """) == [
        "cfg.yaml:7:15: routes.0.upstream: unknown upstream 'user' (known: orders, users)",
        "cfg.yaml:8:11: routes.1.name: duplicate route name 'users' (routes.0 has it too)",
        "cfg.yaml:13:22: routes.1.aggregate.backends.1.upstream: "
        "unknown upstream 'order' (known: orders, users)",
    ]


def test_unknown_upstream_when_none_are_defined() -> None:
    assert errors_of("routes:\n  - {name: a, path: /, upstream: x}\n") == [
        "cfg.yaml:2:34: routes.0.upstream: unknown upstream 'x' (no upstreams are defined)"
    ]


def test_cross_checks_still_run_when_validation_fails() -> None:
    errors = errors_of("""\
        upstreams:
          users: {targets: [http://a:1]}
        routes:
          - {name: a, path: no-slash, upstream: users}
          - {name: a, path: /b, upstream: nobody}
        """)
    assert errors == [
        "cfg.yaml:4:21: routes.0.path: a route path must start with /",
        "cfg.yaml:5:12: routes.1.name: duplicate route name 'a' (routes.0 has it too)",
        "cfg.yaml:5:35: routes.1.upstream: unknown upstream 'nobody' (known: users)",
    ]


def test_cross_check_on_plain_data() -> None:
    problems = cross_check({"upstreams": {"u": {}}, "routes": [{"name": "r", "upstream": "v"}]})
    assert [(p.path, p.message) for p in problems] == [
        (("routes", 0, "upstream"), "unknown upstream 'v' (known: u)")
    ]


def test_duplicate_yaml_key_is_an_error() -> None:
    assert errors_of("server:\n  port: 1\n  port: 2\n") == [
        "cfg.yaml:3:3: server.port: duplicate key 'port' (first on line 2)"
    ]


def test_yaml_syntax_error_has_its_line() -> None:
    errors = errors_of("""\
        server:
          port: 8080
         host: oops
        """)
    assert len(errors) == 1
    assert errors[0].startswith("cfg.yaml:3:2: : YAML syntax error: ")


def test_unterminated_flow_sequence() -> None:
    # libyaml and PyYAML word the problem differently; the positions are the same.
    [error] = errors_of("server:\n  trusted_proxies: [10.0.0.0/8\n")
    assert error.startswith("cfg.yaml:3:1: : YAML syntax error: ")
    assert error.endswith(" (while parsing a flow sequence at line 2, column 20)")


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of("- server\n") == [
        "cfg.yaml:1:1: : the top level must be a mapping of sections "
        "(server, upstreams, routes), not a list"
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == [f"{path}:1:1: : cannot read config: No such file or directory"]


def test_error_string_is_the_lines() -> None:
    with pytest.raises(ConfigError) as info:
        load("server: {a: 1, b: 2}\n")
    assert str(info.value) == (
        "cfg.yaml:1:10: server.a: Extra inputs are not permitted\n"
        "cfg.yaml:1:16: server.b: Extra inputs are not permitted"
    )


# --- ${VAR} interpolation --------------------------------------------------------


def test_variable_is_substituted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOST", "10.1.2.3")
    assert load("server:\n  host: ${TEST_HOST}\n").server.host == "10.1.2.3"


def test_variable_inside_a_longer_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOST", "orders")
    settings = load('upstreams:\n  o:\n    targets: ["http://${TEST_HOST}:${PORT:-81}"]\n')
    assert settings.upstreams["o"].targets[0].url == "http://orders:81"


def test_default_is_used_when_unset_and_typed_as_yaml() -> None:
    settings = load("server:\n  port: ${PORT:-8081}\n  access_log: ${LOG:-false}\n")
    assert settings.server.port == 8081
    assert settings.server.access_log is False


def test_default_is_used_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "")
    assert load("server:\n  port: ${PORT:-8081}\n").server.port == 8081


def test_variable_overrides_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_URL", "http://orders.internal:80")
    settings = load_config_text(EXAMPLE, "x.yaml")
    assert settings.upstreams["orders"].targets[0].url == "http://orders.internal:80"


def test_plain_substitution_is_retyped_but_quoted_stays_a_string() -> None:
    # `admin_host` is a string field: a plain `${X:-1}` is the int 1, which it refuses.
    assert load('server:\n  admin_host: "${X:-1}"\n').server.admin_host == "1"
    with pytest.raises(ConfigError):
        load("server:\n  admin_host: ${X:-1}\n")


def test_unset_variable_is_an_error_at_its_scalar() -> None:
    assert errors_of("""\
        upstreams:
          orders:
            targets: ["${ORDERS_URL}"]
        """) == [
        "cfg.yaml:3:15: upstreams.orders.targets.0: environment variable ORDERS_URL is not set "
        "(write ${ORDERS_URL:-default} to give a default)"
    ]


def test_malformed_reference_is_an_error() -> None:
    assert errors_of("server:\n  host: ${HOST:localhost}\n") == [
        "cfg.yaml:2:9: server.host: malformed reference '${HOST:localhost}': "
        "expected ${NAME} or ${NAME:-default}"
    ]


def test_dollar_dollar_brace_is_a_literal() -> None:
    assert load('server:\n  host: "$${HOST}"\n').server.host == "${HOST}"


# --- environment overrides -----------------------------------------------------------


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "8081")
    settings = load("server:\n  port: 8080\n  host: 127.0.0.1\n")
    assert settings.server.port == 8081
    assert settings.server.host == "127.0.0.1"  # the rest of the section is the file's


def test_bad_environment_override_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "eighty")
    assert errors_of("server:\n  port: 8080\n") == [
        "cfg.yaml:2:9: server.port: Input should be a valid integer, unable to parse string "
        "as an integer (from environment GATEWAY_SERVER__PORT)"
    ]


def test_environment_override_of_a_field_not_in_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SERVER__WORKERS", "0")
    assert errors_of("# empty\nserver:\n  host: x\n") == [
        "cfg.yaml:3:3: server.workers: Input should be greater than or equal to 1 "
        "(from environment GATEWAY_SERVER__WORKERS)"
    ]


def test_environment_section_that_is_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_RATE_LIMIT_STORE", "{redis")
    errors = errors_of("server: {}\n")
    assert len(errors) == 1
    assert errors[0].startswith("cfg.yaml:1:1: rate_limit_store: ")
    assert errors[0].endswith("(from environment GATEWAY_RATE_LIMIT_STORE)")


def test_environment_section_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_RATE_LIMIT_STORE", '{"redis": "redis://r:6379/0"}')
    assert load("").rate_limit_store == RedisStore(redis="redis://r:6379/0")


# --- which file -------------------------------------------------------------------


def test_resolve_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_config_path(None) == "config/gateway.yaml"
    monkeypatch.setenv("GATEWAY_CONFIG", "/etc/gateway/env.yaml")
    assert resolve_config_path(None) == "/etc/gateway/env.yaml"
    assert resolve_config_path("cli.yaml") == "cli.yaml"
