"""``edgefleet rollout``: the command line and the presentation of staged rollouts (see
:mod:`deploy.control.rollout`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import wire
from agent.argparsing import closest
from deploy.control.rollout import Rollout, RolloutController, RolloutStore, default_state_db
from deploy.control.rollout import RolloutState as S
from deploy.errors import RolloutError
from deploy.observe.views import chosen_db, source_args

# ---------------------------------------------------------------- presentation


def summary(store: RolloutStore, r: Rollout) -> dict[str, Any]:
    devices = store.devices(r.id)
    return {
        "id": r.id,
        "model": r.model,
        "manifest_version": r.manifest_version,
        "policy": r.policy,
        "state": r.state.value,
        "reason": r.reason,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "devices": [d.as_dict() for d in devices],
        "transitions": [
            {
                "from": t.from_state.value if t.from_state else None,
                "to": t.to_state.value,
                "at": t.at,
                "reason": t.reason,
            }
            for t in store.transitions(r.id)
        ],
    }


def summary_text(store: RolloutStore, r: Rollout) -> str:
    from deploy.observe.fleet import render_table

    devices = store.devices(r.id)
    head = f"rollout {r.id}: {r.model} v{r.manifest_version}, policy {r.policy}: {r.state}"
    if r.reason:
        head += f" ({r.reason})"
    rows = [
        [
            d.device,
            d.role.value,
            d.variant,
            "yes" if d.assigned_at is not None else "no",
            d.outcome.value if d.outcome else "-",
            d.restored or "-",
        ]
        for d in devices
    ]
    table = render_table(["DEVICE", "ROLE", "VARIANT", "ASSIGNED", "OUTCOME", "RESTORED"], rows)
    history = [
        f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t.at))}  {t.to_state}"
        + (f": {t.reason}" if t.reason else "")
        for t in store.transitions(r.id)
    ]
    return "\n".join([head, table, "history:", *history])


# ---------------------------------------------------------------- CLI


def _open_store(args: argparse.Namespace) -> RolloutStore:
    return RolloutStore(args.state_db or default_state_db())


def _show(store: RolloutStore, r: Rollout, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary(store, r), indent=2, sort_keys=True))
    else:
        print(summary_text(store, r))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_status(args: argparse.Namespace, model: str) -> int:
    with _open_store(args) as store:
        r = store.latest(model)
        if r is None:
            raise RolloutError(f"no rollout of {model} in {store.path}")
        _show(store, r, args.json)
    return 0


def _cmd_abort(args: argparse.Namespace, model: str) -> int:
    from deploy.cli import _session
    from deploy.keys import load_signing_key

    key = load_signing_key(args.key)
    with _open_store(args) as store:
        r = store.unfinished(model)
        if r is None:
            raise RolloutError(f"no unfinished rollout of {model} in {store.path}")
        with _session(args) as session:
            r = RolloutController(session, store, key, progress=_progress).abort(r)
        _show(store, r, args.json)
    return 0


def _cmd_run(args: argparse.Namespace, model: str) -> int:
    from deploy.cli import _session
    from deploy.control.select import load_policy
    from deploy.keys import load_signing_key

    key = load_signing_key(args.key)
    policy = load_policy(args.policy)  # before connecting: a broken policy fails fast
    started = time.monotonic()
    with _open_store(args) as store, _session(args) as session:
        ctl = RolloutController(session, store, key, progress=_progress, poll_s=args.poll)
        r = store.unfinished(model) or store.halted_unrestored(model)
        if r is not None:
            _progress(f"resuming rollout {r.id} ({r.state})")
        elif args.resume:
            raise RolloutError(f"no unfinished rollout of {model} to resume in {store.path}")
        else:
            canary = {
                "canaries": args.canary,
                "canary_percent": args.canary_percent,
                "canary_devices": args.canary_device or (),
            }
            db = chosen_db(args)
            if db is not None:  # the collector's store: the whole fleet, never a cut burst
                from deploy.observe.state import state_from_store

                result = ctl.plan_from_state(state_from_store(db, model), model, policy, **canary)
            else:
                result = ctl.plan(model, policy, allow_partial=args.allow_partial, **canary)
            for device, why in sorted(result.skipped.items()):
                _progress(f"  {device}: not in the rollout: {why}")
            if result.rollout is None:
                print(f"nothing to roll out for {model}: no device needs a change")
                return 0
            r = result.rollout
        r = ctl.run(r, wait=args.wait, timeout_s=args.rollout_timeout)
        _show(store, r, args.json)
    elapsed = time.monotonic() - started
    if r.state is S.HALTED:
        _progress(f"rollout {r.id} halted after {elapsed:.1f} s: {r.reason}")
        return 2
    if r.state is not S.COMPLETED and args.wait:
        _progress(
            f"rollout {r.id} still {r.state} after {elapsed:.1f} s; "
            f"run `edgefleet rollout {model}` to continue"
        )
        return 2
    if r.state is S.COMPLETED:
        _progress(f"rollout {r.id} completed in {elapsed:.1f} s")
    return 0


ACTIONS = ("status", "abort")  # `edgefleet rollout ACTION MODEL`; one word alone is a model


def _cmd_rollout(args: argparse.Namespace) -> int:
    words: list[str] = args.words
    if len(words) == 2 and words[0] in ACTIONS:
        model = wire.check_id(words[1], "model")
        return _cmd_status(args, model) if words[0] == "status" else _cmd_abort(args, model)
    if len(words) != 1:
        guess = closest(words[0], ACTIONS) if len(words) == 2 else None
        hint = f"; did you mean `{guess} {words[1]}`?" if guess else ""
        print(f"edgefleet rollout: expected MODEL, `status MODEL` or `abort MODEL`{hint}", file=sys.stderr)
        return 1
    if args.canary is not None and args.canary_percent is not None:
        print("edgefleet rollout: give --canary or --canary-percent, not both", file=sys.stderr)
        return 1
    return _cmd_run(args, wire.check_id(words[0], "model"))


def _positive_percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage in (0, 100]")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``rollout`` to the ``edgefleet`` command line."""
    p = subparsers.add_parser(
        "rollout",
        parents=list(parents),
        help="staged rollout of a model: canaries first, the rest after they committed",
        description="edgefleet rollout MODEL | rollout status MODEL | rollout abort MODEL",
    )
    p.add_argument("words", nargs="+", metavar="MODEL | status MODEL | abort MODEL")
    p.add_argument("--canary", type=_non_negative, help="number of canary devices (default: 1)")
    p.add_argument("--canary-percent", type=_positive_percent, help="canaries as a percentage (at least 1)")
    p.add_argument("--canary-device", action="append", help="prefer this device as a canary (repeatable)")
    p.add_argument("--policy", type=Path, help="policy TOML (default: highest accuracy, no limits)")
    p.add_argument("--key", type=Path, help="signing key (PEM; default: the fleet key)")
    p.add_argument("--state-db", type=Path, help="rollout database (default: $EDGEFLEET_HOME/rollouts.db)")
    p.add_argument("--wait", action="store_true", help="follow the rollout until completed or halted")
    p.add_argument(
        "--timeout",
        dest="rollout_timeout",
        type=float,
        metavar="S",
        help="with --wait, give up waiting after S seconds (exit 2; the rollout stays resumable); "
        "the broker's connect / ack timeout is --connect-timeout here",
    )
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument(
        "--resume", action="store_true", help="continue the model's unfinished rollout (error if none)"
    )
    p.add_argument("--json", action="store_true", help="print the rollout as JSON")
    source_args(p, "plan")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --from-broker: plan even when the retained burst looks cut (devices may be missing)",
    )
    p.set_defaults(func=_cmd_rollout)
