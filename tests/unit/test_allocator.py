"""gateway/server/allocator.py: when `gateway run` re-executes itself under jemalloc."""

from __future__ import annotations

import pytest

from gateway.server.allocator import ACTIVE_ENV, MALLOC_CONF, AllocatorMissing, reexec_env


def found() -> str | None:
    return "libjemalloc.so.2"


def missing() -> str | None:
    return None


def test_auto_switches_to_jemalloc_when_it_is_installed() -> None:
    env = reexec_env("auto", {"PATH": "/bin"}, found)
    assert env is not None
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"
    assert env["PYTHONMALLOC"] == "malloc"
    assert env["MALLOC_CONF"] == MALLOC_CONF
    assert env[ACTIVE_ENV] == "jemalloc"
    assert env["PATH"] == "/bin"


def test_auto_keeps_python_s_allocator_without_jemalloc() -> None:
    assert reexec_env("auto", {}, missing) is None


def test_required_jemalloc_that_is_missing_is_an_error() -> None:
    with pytest.raises(AllocatorMissing, match="libjemalloc2"):
        reexec_env("jemalloc", {}, missing)


def test_python_never_switches() -> None:
    assert reexec_env("python", {}, found) is None


def test_never_twice_and_never_over_the_operator_s_choice() -> None:
    assert reexec_env("auto", {ACTIVE_ENV: "jemalloc"}, found) is None
    assert reexec_env("auto", {"PYTHONMALLOC": "pymalloc_debug"}, found) is None
    assert reexec_env("jemalloc", {"LD_PRELOAD": "/opt/libjemalloc.so"}, found) is None


def test_other_preloads_and_malloc_conf_are_kept() -> None:
    env = reexec_env("auto", {"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2"}, found)
    assert env is not None
    assert env["LD_PRELOAD"] == "libfoo.so libjemalloc.so.2"
    assert env["MALLOC_CONF"] == "narenas:2"
