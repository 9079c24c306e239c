"""The `gateway` command: `run` serves, `check` validates a config and shows its routes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from gateway import __version__
from gateway.config.loader import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    load_config,
    resolve_config_path,
    route_table,
)

__all__ = ["main"]

_DESCRIPTION = """\
A high-concurrency API gateway: a streaming reverse proxy with per-upstream
bulkheads, retries, circuit breakers and fan-out aggregation.
"""

_EPILOG = f"""\
config file:
  `run` reads -c FILE, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}.
  Any setting can be overridden from the environment, e.g. GATEWAY_SERVER__PORT=8081,
  and ${{VAR}} or ${{VAR:-default}} inside the YAML is replaced from the environment.

examples:
  gateway check config/gateway.yaml     validate; print the route table or every error
  gateway run                           serve with {DEFAULT_CONFIG_PATH}
  gateway run -c prod.yaml --workers 4  serve with 4 worker processes
  GATEWAY_CONFIG=prod.yaml gateway run --port 9000
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process's exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 1
    if args.command == "check":
        return _check(args.file)
    if args.command == "run":
        if argv is None and not _allocator(resolve_config_path(args.config)):
            return 1
        return _run(args.config, workers=args.workers, port=args.port)
    parser.print_help(sys.stderr)
    return 2


def _check(file: str) -> int:
    try:
        settings = load_config(file)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    from gateway.build.factory import unsupported

    problems = unsupported(settings)
    if problems:
        # Valid YAML, but `gateway run` would refuse it: say so here too.
        for problem in problems:
            print(f"{file}: {problem}", file=sys.stderr)
        return 1
    print(route_table(settings))
    return 0


def _allocator(config_path: str) -> bool:
    """Re-execute under the configured allocator if it is not in place yet (this process
    is then replaced); False when it cannot be had. Only for the process's own command
    line: `main(argv)` called from Python never replaces its caller."""
    from gateway.server import allocator

    try:
        setting = load_config(config_path).server.allocator
    except ConfigError:
        return True  # `run` reports it, with file, line and field
    try:
        env = allocator.reexec_env(setting, os.environ)
    except allocator.AllocatorMissing as exc:
        print(f"{config_path}: {exc}", file=sys.stderr)
        return False
    if env is not None:
        allocator.reexec(env)
    return True


def _run(config: str | None, *, workers: int | None, port: int | None) -> int:
    # Imported here so that `check` and `--help` never load the server stack.
    from gateway.server import run

    return run(resolve_config_path(config), workers=workers, port=port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="serve the data plane and the admin listener until SIGTERM/SIGINT, then drain",
        description="Serve the data plane and the admin listener until SIGTERM or SIGINT, "
        "then drain in-flight requests. SIGHUP reloads the config.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    run.add_argument(
        "--workers",
        type=_int_in(1, 64),
        metavar="N",
        help="worker processes (overrides server.workers)",
    )
    run.add_argument(
        "--port",
        type=_int_in(0, 65535),
        metavar="P",
        help="data-plane port (overrides server.port)",
    )

    check = commands.add_parser(
        "check",
        help="validate a config; print its route table, or every error as FILE:LINE:COL",
        description="Validate a config file. On success print the route table and exit 0; "
        "otherwise print every error to stderr as `FILE:LINE:COL: path.to.field: message` "
        "and exit 1.",
    )
    check.add_argument("file", metavar="FILE", help="the config file to validate")
    return parser


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse
