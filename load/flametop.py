"""Where the time goes: the top frames by own time in a `py-spy record --format raw` file.

    python load/flametop.py load/results/profile-<ts>/profile.raw [--top 25]

The raw format is one collapsed stack per line, `frame;frame;...;leaf COUNT`, each frame
`function (file:line)`. Own time is the leaf's share of all samples; total time counts
every stack a function appears in once. Lines are merged per function (not per line),
paths shortened to the package (`aiohttp/client.py`, `gateway/dataplane/app.py`), and own time
is also summed per top-level package, which is often the quickest read of a profile.
A file recorded with `py-spy record --threads` (each stack starting `thread (ID): NAME`)
is also summed per thread name (the event loop's `MainThread`, an exporter's thread).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Profile", "parse", "render", "short_path"]

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_ANCHORS = ("site-packages/", "dist-packages/", "lib/python3")
_PROCESS = re.compile(r"^process \d+:")  # py-spy --subprocesses: the process, first
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\)(?:: (?P<name>.*))?$")


def short_path(path: str) -> str:
    """`/.../site-packages/aiohttp/client.py` -> `aiohttp/client.py`; the stdlib as
    `asyncio/events.py`; the project's own files relative to the repository."""
    for anchor in _ANCHORS:
        if anchor in path:
            tail = path.split(anchor, 1)[1]
            if anchor == "lib/python3":
                tail = tail.split("/", 1)[1] if "/" in tail else tail
            return tail
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return path.removeprefix(root)


def frame_key(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['name']} ({short_path(match['path'])})"


def package_of(key: str) -> str:
    match = re.search(r"\(([^()]*)\)$", key)
    if match is None:
        return key
    path = match.group(1)
    if path.endswith((".so", ".so.1")) or ".so." in path or ("/" not in path and "." not in path):
        return "native"
    head = path.split("/", 1)[0]
    return head.removesuffix(".py")


@dataclass
class Profile:
    samples: int
    own: Counter[str]
    total: Counter[str]
    packages: Counter[str]
    threads: Counter[str] = field(default_factory=Counter)  # with py-spy --threads only


def parse(lines: Iterable[str]) -> Profile:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        while frames and _PROCESS.match(frames[0]):
            frames = frames[1:]
        thread = _THREAD.match(frames[0]) if frames else None
        if thread is not None:
            threads[thread["name"] or frames[0]] += count
            frames = frames[1:]
        frames = [frame_key(f) for f in frames]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        packages[package_of(frames[-1])] += count
        for key in set(frames):
            total[key] += count
    return Profile(samples, own, total, packages, threads)


def render(profile: Profile, top: int = 25) -> str:
    if profile.samples == 0:
        return "no samples (was the process busy? py-spy records on-CPU time only)\n"
    n = profile.samples
    lines = [f"{n:,} samples", "", f"top {top} frames by own time:", ""]
    lines.append(f"{'own %':>7} {'total %':>8}  function (file)")
    for key, count in profile.own.most_common(top):
        lines.append(f"{100 * count / n:6.1f}% {100 * profile.total[key] / n:7.1f}%  {key}")
    lines += ["", "own time by package:", ""]
    for package, count in profile.packages.most_common(15):
        lines.append(f"{100 * count / n:6.1f}%  {package}")
    if len(profile.threads) > 1:
        lines += ["", "samples by thread:", ""]
        for thread, count in profile.threads.most_common(10):
            lines.append(f"{100 * count / n:6.1f}%  {thread}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="a py-spy --format raw file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with args.raw.open(errors="replace") as fh:
        print(render(parse(fh), args.top), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
