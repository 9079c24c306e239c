"""The memory allocator `gateway run` serves with: jemalloc where the system has it.

CPython's small-object allocator (pymalloc) gives a 1 MiB arena back to the system only
once every object in it is gone. After a burst of client connections closes, a few
long-lived objects allocated during it (uvloop's handle free lists, the last response
headers of pooled upstream connections, counters and timestamps) stay scattered over
the burst's arenas and keep them resident. With every allocation going to jemalloc
(`PYTHONMALLOC=malloc`), which hands unused pages back within a second, little of it
is kept (docs/performance.md, "Figures that used to live in docstrings").

Both must be in place before the interpreter starts, so `gateway run` re-executes
itself once, with the same arguments, with `LD_PRELOAD` naming jemalloc and
`PYTHONMALLOC=malloc` (workers inherit both). `server.allocator` chooses:

- `auto` (default): jemalloc when `libjemalloc.so.2` is installed, else Python's own;
- `jemalloc`: refuse to start without it;
- `python`: never switch.

An allocator chosen by the operator (`PYTHONMALLOC` or a jemalloc in `LD_PRELOAD` set
before start) is left as it is.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping

__all__ = ["ACTIVE_ENV", "AllocatorMissing", "active", "reexec", "reexec_env"]

ACTIVE_ENV = "GATEWAY_ALLOCATOR"  # set on the re-executed process: never twice
# Unused pages go back to the system within a second, by a background thread, so an
# idle gateway shrinks without a request to trigger it.
MALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


class AllocatorMissing(RuntimeError):
    """`server.allocator: jemalloc` on a system without libjemalloc."""


def _find_jemalloc() -> str | None:
    return ctypes.util.find_library("jemalloc")


def reexec_env(
    setting: str,
    environ: Mapping[str, str],
    find: Callable[[], str | None] = _find_jemalloc,
) -> dict[str, str] | None:
    """The environment to re-execute with for `setting`, or None to carry on as is."""
    if environ.get(ACTIVE_ENV) or setting == "python":
        return None
    if environ.get("PYTHONMALLOC") or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None  # the operator's choice
    library = find()
    if not library:
        if setting == "jemalloc":
            raise AllocatorMissing(
                "server.allocator is jemalloc, but libjemalloc is not installed "
                "(Debian: apt-get install libjemalloc2)"
            )
        return None
    preload = " ".join(p for p in (environ.get("LD_PRELOAD", ""), str(library)) if p)
    return {
        **environ,
        "LD_PRELOAD": preload,
        "PYTHONMALLOC": "malloc",
        "MALLOC_CONF": environ.get("MALLOC_CONF") or MALLOC_CONF,
        ACTIVE_ENV: "jemalloc",
    }


def reexec(env: dict[str, str]) -> None:
    """Replace this process with `python -m gateway ARGS...` under `env`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "gateway", *sys.argv[1:]], env)


def active() -> str:
    """The allocator this process allocates with, for the start-up log line."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            if "libjemalloc" in maps.read():
                return "jemalloc"
    except OSError:
        pass
    return "malloc" if os.environ.get("PYTHONMALLOC", "").startswith("malloc") else "python"
