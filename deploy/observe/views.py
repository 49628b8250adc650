"""Read-only views of the fleet: ``edgefleet fleet``, ``edgefleet report``, ``edgefleet plot``.

::

    edgefleet fleet [--model M] [--json] [--db URL | --from-broker]      one row per device and model
    edgefleet report DEVICE [--model M] [--json] [--db URL | --from-broker]   every result of one device
    edgefleet plot MODEL --out FILE.png [--db URL | --from-broker]   p50 latency (log) vs host accuracy

With ``--db``, or without it when the collector's database exists at the default path
(:func:`deploy.observe.state.default_store`), they read that store, SQLite or PostgreSQL
(``edgefleet collect``):
statuses, latest reports, manifests and assignments (a collector whose ACL does not let it read the
manifests and assignments leaves host accuracy and "assigned" empty). No store there: an error naming
what to run. Only with ``--from-broker`` they read what the broker holds retained, and print one warning
line when that burst looks cut (the broker's queue limit; see :mod:`deploy.observe.state`). ``plot``
reads the same way.
Energy figures that come from the utilisation model are always marked "(modelled)".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import wire
from deploy.errors import StateError
from deploy.observe.state import FleetState


def state_from_db(path: Path | str, model: str | None = None) -> FleetState:
    """A FleetState from the collector database (see :func:`deploy.observe.state.state_from_store`)."""
    from deploy.observe.state import state_from_store

    return state_from_store(path, model)


def source_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--db URL`` and ``--from-broker``: where a command reads the fleet (see :func:`choose_db`)."""
    from deploy.observe.state import DB_ENV, DEFAULT_DB

    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--db",
        metavar="URL",
        help=f"{what} from the collector's store (edgefleet collect --db): a file, sqlite:///PATH or "
        f"postgresql://USER@HOST:PORT/DB; default: ${DB_ENV}, else {DEFAULT_DB} (no store: an error)",
    )
    g.add_argument(
        "--from-broker",
        action="store_true",
        help="read the broker's retained messages instead (lab mode: the broker cuts that burst past "
        "its queue limit, which is detected and reported)",
    )


def chosen_db(args: argparse.Namespace) -> Path | str | None:
    """The database the command reads (None: the broker); says so on stderr when it is the default one."""
    from deploy.observe.state import choose_db

    path, note = choose_db(getattr(args, "db", None), getattr(args, "from_broker", False))
    if note:
        print(f"edgefleet: {note}", file=sys.stderr, flush=True)
    return path


def _read_state(args: argparse.Namespace, model: str | None) -> FleetState:
    db = chosen_db(args)
    if db is not None:
        return state_from_db(db, model)
    from deploy.cli import _session
    from deploy.observe.state import collect_state

    with _session(args) as session:
        state = collect_state(session, model)
    if state.cut:
        print(f"edgefleet: warning: {state.cut_message()}", file=sys.stderr, flush=True)
    return state


def _warn_skipped(state: FleetState) -> None:
    for line in state.skipped:
        print(f"edgefleet: warning: skipped {line}", file=sys.stderr)


def _cmd_fleet(args: argparse.Namespace) -> int:
    from deploy.observe.fleet import fleet_rows, fleet_table

    model = wire.check_id(args.model, "model") if args.model else None
    state = _read_state(args, model)
    rows = fleet_rows(state)
    if model is not None:
        rows = [r for r in rows if r.model in (model, None)]
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2, sort_keys=True))
    elif rows:
        print(fleet_table(rows))
    else:
        print("no device has published a status yet")
    if not args.json and state.source != "broker":  # the controller's proposals and last actions
        from deploy.control.controller_journal import summary_lines

        for line in summary_lines(getattr(args, "db", None) or state.source):
            print(line)
    _warn_skipped(state)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from deploy.observe.fleet import report_rows, report_table

    device = wire.check_id(args.device, "device")
    model = wire.check_id(args.model, "model") if args.model else None
    state = _read_state(args, model)
    rows = report_rows(state, device, model)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2, sort_keys=True))
    elif rows:
        print(report_table(rows))
    else:
        where = f" for {model}" if model else ""
        raise StateError(f"no report from {device}{where}")
    _warn_skipped(state)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from deploy.observe.plot import plot_model

    model = wire.check_id(args.model, "model")
    state = _read_state(args, model)
    print(plot_model(state, model, args.out))
    _warn_skipped(state)
    return 0


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``fleet``, ``report`` and ``plot`` to the ``edgefleet`` command line."""
    fl = subparsers.add_parser(
        "fleet", parents=list(parents), help="devices, active variants, state, latest latency and energy"
    )
    fl.add_argument("--model", help="only this model")
    fl.add_argument("--json", action="store_true", help="rows as JSON")
    source_args(fl, "read")
    fl.set_defaults(func=_cmd_fleet)

    rp = subparsers.add_parser("report", parents=list(parents), help="every benchmark result of one device")
    rp.add_argument("device", help="device id")
    rp.add_argument("--model", help="only this model")
    rp.add_argument("--json", action="store_true", help="rows as JSON")
    source_args(rp, "read")
    rp.set_defaults(func=_cmd_report)

    pl = subparsers.add_parser(
        "plot", parents=list(parents), help="PNG of latency (p50, log) vs host accuracy for every device"
    )
    pl.add_argument("model", help="model id")
    pl.add_argument("--out", type=Path, required=True, help="output PNG file")
    source_args(pl, "read")
    pl.set_defaults(func=_cmd_plot)
