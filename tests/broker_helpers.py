"""A mosquitto started on `edgefleet broker-config`'s own output (TLS listener, passwords, ACL), on a free
loopback port, for the tests that need the production configuration rather than an open broker."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from deploy.broker.client import BrokerOptions
from deploy.broker.conf import BrokerSpec, write_broker_config
from deploy.broker.spawn import MosquittoBroker, free_port
from deploy.observe.collect import Collector, CollectorOptions
from deploy.observe.store import FleetStore
from deploy.observe.store_sql import StoreSchemaError

T = TypeVar("T")


def read_store(db: Path, read: Callable[[FleetStore], T]) -> T | None:
    """``read(store)`` of the store a collector keeps at ``db``; None while the collector is still creating
    it (no file yet, or the file created but its schema not yet committed: a normal moment, not an error)."""
    if not db.exists():
        return None
    try:
        with FleetStore(db, readonly=True) as store:
            return read(store)
    except StoreSchemaError:
        return None


@contextlib.contextmanager
def generated_tls_broker(
    tmp: Path, devices: Sequence[str], host: str = "127.0.0.1", **config: Any
) -> Iterator[tuple[MosquittoBroker, Path, Any]]:
    """broker-config into ``tmp/broker`` (state and log in ``tmp/state``), mosquitto started on it; yields
    the broker, the config directory and what write_broker_config returned. ``config``: more keyword
    arguments of write_broker_config."""
    out, state = tmp / "broker", tmp / "state"
    state.mkdir()
    port = free_port()
    spec = BrokerSpec(
        install_dir=out,
        port=port,
        bind=host,
        tls=True,
        state_dir=state,
        log_dest=f"file {state / 'mosquitto.log'}",
        extra=["user root"] if os.geteuid() == 0 else [],  # pytest's tmp dirs are closed to "mosquitto"
    )
    files = write_broker_config(out, spec, devices=list(devices), server_names=["localhost", host], **config)
    with MosquittoBroker(port=port, state_dir=state, config=(out / "mosquitto.conf").read_text()) as b:
        yield b, out, files


class RunningCollector:
    """A collector (deploy.observe.collect.Collector) storing from ``options``'s broker into ``db`` in a
    thread,
    until the ``with`` block ends; its exit asserts that it stopped cleanly."""

    def __init__(self, options: BrokerOptions, db: Path, duration_s: float = 60, **collector: Any) -> None:
        self.collector = Collector(options, db, CollectorOptions(**collector))
        self.duration_s = duration_s
        self.ready = threading.Event()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.collector.run(duration_s=self.duration_s, ready=self.ready)

    def __enter__(self) -> RunningCollector:
        self.thread.start()
        assert self.ready.wait(10), "collector did not subscribe"
        return self

    def __exit__(self, *exc: object) -> None:
        self.collector.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()
        assert self.code == 0, self.collector.fatal


@contextlib.contextmanager
def fleet_source(kind: str, options: BrokerOptions, db: Path) -> Iterator[tuple[list[str], Any]]:
    """Where the host commands read the fleet: ("store") a collector storing from ``options``'s broker
    into ``db`` through the block, passed as --db, and a ``synced(**counts)`` that waits until the store
    holds at least those rows (e.g. ``synced(manifests=1, reports=2)``); ("broker") --from-broker, the
    explicit lab mode, and a ``synced`` that returns at once."""
    if kind == "broker":
        yield ["--from-broker"], lambda **_: None
        return

    def synced(**want: int) -> None:
        deadline = time.monotonic() + 15
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = read_store(db, FleetStore.counts) or {}
            if all(counts.get(t, 0) >= n for t, n in want.items()):
                return
            time.sleep(0.1)
        raise AssertionError(f"the collector stored {counts}, the test waits for {want}")

    with RunningCollector(options, db):
        yield ["--db", str(db)], synced
