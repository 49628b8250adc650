"""Signed commands to one device, and waiting for its answer: ``edgefleet cmd DEVICE ACTION``.

A :class:`agent.wire.Command` (ping, rebenchmark, cancel, rollback) is signed with the fleet key and published
QoS1, *not* retained, on ``{ns}/devices/{device}/cmd``, with a fresh correlation id. The agent answers
with an :class:`agent.wire.Event` on ``{ns}/devices/{device}/events`` carrying that id (``pong``,
``ack``, ``rolled_back``, or ``rejected`` with a reason code).

The events topic is subscribed *before* the command is published, so a fast answer is never missed.
Commands are not retained on purpose: an offline device must not act on a stale "rollback" hours
later. With a persistent agent session (``clean_start=False``) the broker still queues it for a
device that is briefly disconnected.

Exit codes of ``edgefleet cmd``: 0 the command was published (and, with ``--wait``, the device
answered), 2 no answer within ``--wait`` seconds, or the device refused the command (``rejected`` /
``error`` event: the event is printed, the reason goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from deploy.broker.client import Bus
from deploy.errors import CommandTimeout


def new_correlation_id(prefix: str = "cmd") -> str:
    """A fresh identifier that matches the wire's id pattern (``cmd-<16 hex>``)."""
    return wire.check_id(f"{prefix}-{secrets.token_hex(8)}", "correlation id")


def make_command(
    device: str,
    action: wire.CommandAction | str,
    key: Ed25519PrivateKey,
    model: str | None = None,
    correlation_id: str | None = None,
    issued_at: float | None = None,
) -> wire.Command:
    """A signed command (raises ``pydantic.ValidationError`` for e.g. a rollback without a model)."""
    cmd = wire.Command(
        id=correlation_id or new_correlation_id(),
        device=device,
        action=wire.CommandAction(action),
        model=model,
        issued_at=wire.now() if issued_at is None else issued_at,
    )
    return wire.sign(cmd, key)


def publish_command(bus: Bus, command: wire.Command) -> None:
    """Publish QoS1, not retained, and wait for the broker's acknowledgement."""
    bus.publish(bus.topics.cmd(command.device), command.to_json(), retain=False, qos=1)
    bus.flush()


@dataclass(frozen=True, slots=True)
class Answer:
    command: wire.Command
    event: wire.Event
    seconds: float

    @property
    def refused(self) -> bool:
        return self.event.kind in (wire.EventKind.REJECTED, wire.EventKind.ERROR)


def send_and_wait(bus: Bus, command: wire.Command, wait_s: float) -> Answer:
    """Subscribe to the device's events, publish ``command``, return the first event carrying its id."""
    start = time.monotonic()
    topic = bus.topics.events(command.device)
    with bus.watch([topic]) as watch:
        publish_command(bus, command)
        deadline = start + wait_s
        while True:
            for _, payload in watch.drain():
                try:
                    event = wire.decode(wire.Event, payload)
                except wire.WireError:
                    continue  # another device's broken payload must not break our wait
                if event.correlation_id == command.id and event.device == command.device:
                    return Answer(command, event, time.monotonic() - start)
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandTimeout(
                    f"{command.device} did not answer {command.action.value} (id {command.id}) within "
                    f"{wait_s:g} s: is it online (edgefleet fleet) and does it trust this key?"
                )
            watch.wait(min(left, 0.5))


# ---------------------------------------------------------------- CLI


def _cmd(args: argparse.Namespace) -> int:
    from deploy.cli import _session
    from deploy.keys import load_signing_key

    device = wire.check_id(args.device, "device")
    model = wire.check_id(args.model, "model") if args.model else None
    action = wire.CommandAction(args.action)
    if action is not wire.CommandAction.PING and model is None:
        print(f"edgefleet cmd: {action.value} needs --model", file=sys.stderr)
        return 1
    key = load_signing_key(args.key)
    command = make_command(device, action, key, model=model)
    with _session(args) as session:
        if args.wait is None:
            publish_command(session, command)
            print(json.dumps({"published": command.id, "device": device, "action": action.value}))
            return 0
        answer = send_and_wait(session, command, args.wait)
    out: dict[str, Any] = answer.event.model_dump(mode="json", by_alias=True, exclude_none=True)
    out["answered_in_s"] = round(answer.seconds, 3)
    print(json.dumps(out, sort_keys=True))
    if answer.refused:
        reason = answer.event.reason.value if answer.event.reason else "no reason code"
        print(
            f"edgefleet cmd: {device} refused {action.value}: {reason}: {answer.event.detail}",
            file=sys.stderr,
        )
        return 2
    return 0


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``cmd`` to the ``edgefleet`` command line."""
    p = subparsers.add_parser(
        "cmd",
        parents=list(parents),
        help="send a signed command to a device (ping, rebenchmark, cancel, rollback)",
        description="Publish a signed command (QoS1, not retained) and optionally wait for the answer.",
    )
    p.add_argument("device", help="device id")
    p.add_argument("action", choices=[a.value for a in wire.CommandAction], help="what the device should do")
    p.add_argument("--model", help="model id (required for rebenchmark, cancel and rollback)")
    p.add_argument(
        "--wait",
        type=float,
        metavar="S",
        help="wait up to S seconds for the device's answer and print it (exit 2 on timeout)",
    )
    p.add_argument("--key", type=Path, help="signing key (PEM; default: the fleet key)")
    p.set_defaults(func=_cmd)
