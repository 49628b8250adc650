"""Read-only views of the fleet: ``edgefleet fleet``, ``edgefleet report``, ``edgefleet plot``.

::

    edgefleet fleet [--model M] [--json] [--db PATH]      one row per device and model
    edgefleet report DEVICE [--model M] [--json] [--db PATH]   every benchmark result of one device
    edgefleet plot MODEL --out FILE.png                   latency (p50, log) vs host accuracy, per device

Without ``--db`` they read what the broker holds retained (manifests, statuses, reports,
assignments). With ``--db`` they read the collector's SQLite database (``edgefleet collect``), which
has statuses and reports but no manifests or assignments: host accuracy and "assigned" are then
empty unless the view also reaches the broker (``report`` does not need it; ``plot`` always reads
the broker). Energy figures that come from the utilisation model are always marked "(modelled)".
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
from deploy.state import FleetState


def state_from_db(path: Path, model: str | None = None) -> FleetState:
    """A FleetState from the collector database (statuses and latest reports; no manifests)."""
    from deploy.store import FleetStore

    if not path.exists():
        raise StateError(f"collector database {path} does not exist (run `edgefleet collect --db {path}`)")
    with FleetStore(path, readonly=True) as store:
        state = FleetState(statuses=store.latest_statuses(), reports=store.all_latest_reports())
    if model is not None:
        state.reports = {k: v for k, v in state.reports.items() if k[1] == model}
    return state


def _read_state(args: argparse.Namespace, model: str | None) -> FleetState:
    if getattr(args, "db", None) is not None:
        return state_from_db(args.db, model)
    from deploy.cli import _session
    from deploy.state import collect_state

    with _session(args) as session:
        return collect_state(session, model)


def _warn_skipped(state: FleetState) -> None:
    for line in state.skipped:
        print(f"edgefleet: warning: skipped {line}", file=sys.stderr)


def _cmd_fleet(args: argparse.Namespace) -> int:
    from deploy.fleet import fleet_rows, fleet_table

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
    _warn_skipped(state)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from deploy.fleet import report_rows, report_table

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
    from deploy.plot import plot_model

    model = wire.check_id(args.model, "model")
    args.db = None
    state = _read_state(args, model)
    print(plot_model(state, model, args.out))
    _warn_skipped(state)
    return 0


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``fleet``, ``report`` and ``plot`` to the ``edgefleet`` command line."""
    db_help = "read the collector database (edgefleet collect --db) instead of the broker"
    fl = subparsers.add_parser(
        "fleet", parents=list(parents), help="devices, active variants, state, latest latency and energy"
    )
    fl.add_argument("--model", help="only this model")
    fl.add_argument("--json", action="store_true", help="rows as JSON")
    fl.add_argument("--db", type=Path, help=db_help)
    fl.set_defaults(func=_cmd_fleet)

    rp = subparsers.add_parser("report", parents=list(parents), help="every benchmark result of one device")
    rp.add_argument("device", help="device id")
    rp.add_argument("--model", help="only this model")
    rp.add_argument("--json", action="store_true", help="rows as JSON")
    rp.add_argument("--db", type=Path, help=db_help)
    rp.set_defaults(func=_cmd_report)

    pl = subparsers.add_parser(
        "plot", parents=list(parents), help="PNG of latency (p50, log) vs host accuracy for every device"
    )
    pl.add_argument("model", help="model id")
    pl.add_argument("--out", type=Path, required=True, help="output PNG file")
    pl.set_defaults(func=_cmd_plot)
