"""``edgefleet-agent``: run the device daemon.

Exit codes: 0 clean stop (SIGTERM/SIGINT) or valid config; 1 configuration error; 2 the broker refused our
credentials (retrying cannot help); 3 unexpected internal error. Importing this module loads nothing heavy:
the daemon is imported only when it runs, and the TFLite runtime only in benchmark child processes.
"""

from __future__ import annotations

import os

# Before pydantic is imported: its plugin loader reads the entry points of every installed distribution
# at the first model class (3.4 MB of the idle daemon's PSS in a host venv); the agent uses no plugin.
# Only this entry point sets it (the host tools import agent.wire, not this), and an operator's own
# setting wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from agent import __version__
from agent.argparsing import StrictParser
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.errors import ConfigError, ConnectionFatal

log = logging.getLogger("agent")

EXIT_OK, EXIT_CONFIG, EXIT_FATAL_CONNECTION, EXIT_INTERNAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = StrictParser(
        prog="edgefleet-agent",
        description="edgefleet device agent: fetch signed TFLite variants over MQTT, benchmark them on this "
        "device, report, and activate the variant the host assigns (with health check and rollback).",
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG_PATH, help=f"agent.toml (default {DEFAULT_CONFIG_PATH})"
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config, the files it names (readable by the service user), the TLS files, the "
        "trusted keys and the store; exit 0 (OK) or 1 (one line per failure)",
    )
    p.add_argument(
        "--connect",
        action="store_true",
        help="with --check-config (implies it): also connect to the broker with the configured credentials "
        "and TLS and report its answer (within mqtt.connect_timeout_s)",
    )
    p.add_argument(
        "--service-user",
        metavar="USER",
        help="with --check-config (implies it): check file access for USER (default: the current user; as "
        "root, the unit's user 'edgefleet' when it exists)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log_level")
    p.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    add_calibrate_parser(p)
    return p


def add_calibrate_parser(p: argparse.ArgumentParser) -> None:
    """``edgefleet-agent calibrate [--config agent.toml] [--seconds S]`` (see :mod:`agent.calibrate`)."""
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser(
        "calibrate",
        help="measure idle and full-load power with this board's sensor; write the power profile",
        description="Sample idle power for S seconds, then full load (a busy loop per CPU) for S seconds, "
        "with the best measured energy backend, and write [energy].profile_file (default "
        "<store.path>/power-profile.json). Exit 1 when the board has no power sensor.",
    )
    c.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="agent.toml")
    c.add_argument("--seconds", type=float, default=10.0, help="seconds idle and seconds loaded (default 10)")
    c.add_argument("--root", type=Path, default=Path("/"), help="read sensors under ROOT (recorded trees)")


def run_calibrate(args: argparse.Namespace, config: AgentConfig) -> int:
    from agent.board import HardwareError
    from agent.calibrate import calibrate

    setup_logging(args.log_level or config.log_level)
    try:
        cal = calibrate(config, args.seconds, root=args.root)
    except HardwareError as err:
        print(f"edgefleet-agent calibrate: {err}", file=sys.stderr)
        return EXIT_CONFIG
    prof = cal.profile
    print(
        f"wrote {cal.path}: idle {prof.idle_w:.3f} W ({cal.idle_samples} samples), full load "
        f"{prof.max_w:.3f} W ({cal.load_samples} samples); {prof.source}"
    )
    return EXIT_OK


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("paho").setLevel(logging.WARNING)


def run_check_config(args: argparse.Namespace, config: AgentConfig) -> int:
    """Print each failure and warning on one line (stderr), then an OK summary (stdout) or exit 1."""
    from agent.checks import check_config, check_connect, resolve_service_user

    user, results = resolve_service_user(args.service_user)
    results += check_config(config, user)
    if args.connect:
        results += check_connect(config)
    for r in results:
        if r.level.value != "ok":
            print(r.line(), file=sys.stderr)
        elif args.connect and r.key == "mqtt":
            print(r.line())  # what the broker answered
    failures = sum(r.failed for r in results)
    if failures:
        print(f"{args.config}: {failures} check(s) failed", file=sys.stderr)
        return EXIT_CONFIG
    warnings = sum(r.level.value == "warning" for r in results)
    print(
        f"{args.config}: OK (device {config.device.id}, broker {config.mqtt.host}:{config.mqtt.port}; "
        f"{len(results) - warnings} checks passed for user {user.name}, {warnings} warning(s))"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.connect or args.service_user is not None:
        args.check_config = True
    try:
        # --check-config reports every bad trusted key itself, one line each
        config = load_config(args.config, verify_keys=not args.check_config)
    except ConfigError as err:
        print(f"edgefleet-agent: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "command", None) == "calibrate":
        return run_calibrate(args, config)
    if args.check_config:
        return run_check_config(args, config)
    setup_logging(args.log_level or config.log_level)

    from agent.daemon import Agent

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon = Agent(config, stop=stop)
        log.info(
            "edgefleet-agent %s starting as device %s, store %s",
            __version__,
            config.device.id,
            config.store.path,
        )
        daemon.run()
    except ConfigError as err:
        log.error("%s", err)  # noqa: TRY400 - the message says what to fix; a traceback would not
        return EXIT_CONFIG
    except ConnectionFatal as err:
        log.error("fatal: %s", err)  # noqa: TRY400
        return EXIT_FATAL_CONNECTION
    except Exception:
        log.exception("internal error; exiting (systemd restarts the agent)")
        return EXIT_INTERNAL
    log.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
