"""What the broker holds retained about the fleet: manifests, device statuses, reports, assignments.

``collect_state(session, model)`` reads it once (subscribe, gather until quiet, unsubscribe) and decodes
every payload with the wire models. A payload that fails to decode is skipped and listed in
``FleetState.skipped``, never fatal: one broken device must not hide the rest of the fleet.

The wildcards used here (statuses, reports, assignments) are fine for a lab-sized fleet; mosquitto cuts
a retained burst past ``max_inflight_messages`` + ``max_queued_messages`` (20 + 1000 by default) and
tells the subscriber nothing. ``collect_state`` therefore checks the burst (:func:`burst_problems`) and
lists in ``FleetState.cut`` why it looks cut; the deciding commands refuse such a state. The complete
picture is the collector's database: :func:`state_from_store` builds the same ``FleetState`` from it.

How a cut is detected, most certain first:

* the manifests are subscribed *last* in the one SUBSCRIBE: mosquitto queues retained messages filter by
  filter, in order, and drops everything once its queue is full, so a cut burst loses the manifests
  first. They are then read again on their own (a handful of messages, never cut): a manifest that exists
  but did not arrive in the burst proves the cut (measured: 120 of 601 messages arrived with
  ``max_queued_messages 100``, every one a status, no manifest);
* a sample of per-device topics the burst did not bring but may exist (the report of a device that has a
  status, the status of a device that has a report or assignment) is read topic by topic: one that exists
  proves the cut (this also covers a broker that drops elsewhere than the tail);
* without manifests to check against: a burst that stopped at a round number of messages (100, 1000, ...,
  or that plus mosquitto's default in-flight window of 20), or reports/assignments of devices that have no
  status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import wire
from deploy.broker.client import Bus
from deploy.errors import StateError


@dataclass
class FleetState:
    manifests: dict[str, wire.Manifest] = field(default_factory=dict)
    statuses: dict[str, wire.Status] = field(default_factory=dict)
    reports: dict[tuple[str, str], wire.Report] = field(default_factory=dict)  # (device, model)
    assignments: dict[tuple[str, str], wire.Assignment] = field(default_factory=dict)  # (device, model)
    skipped: list[str] = field(default_factory=list)  # "topic: why" for payloads that did not decode
    collected_at: float = field(default_factory=time.time)
    source: str = "broker"  # "broker", or the collector database's path
    arrived: int = 0  # messages in the broker's burst (0 for a database)
    cut: list[str] = field(default_factory=list)  # why the broker's burst looks cut; empty: looks whole

    def cut_message(self) -> str:
        """One line: how many arrived, why it looks cut, what to do (empty if it does not look cut)."""
        if not self.cut:
            return ""
        return (
            f"the broker's retained burst looks cut ({self.arrived} messages arrived; "
            f"{'; '.join(self.cut)}): part of the fleet is missing. "
            "Run `edgefleet collect --db FILE` and pass --db FILE, or raise max_queued_messages on the broker"
        )

    def reports_for(self, model: str) -> dict[str, wire.Report]:
        return {dev: r for (dev, m), r in self.reports.items() if m == model}

    @property
    def devices(self) -> list[str]:
        return sorted(set(self.statuses) | {d for d, _ in self.reports} | {d for d, _ in self.assignments})

    def manifest(self, model: str) -> wire.Manifest:
        """The manifest of ``model``; StateError naming the published models if the source has none."""
        manifest = self.manifests.get(model)
        if manifest is None:
            known = ", ".join(sorted(self.manifests))
            published = (
                f"models published: {known}" if known else "no model is published yet (edgefleet publish)"
            )
            where = "on the broker" if self.source == "broker" else f"in {self.source}"
            raise StateError(f"no manifest for model {model!r} {where}; {published}")
        return manifest


DEFAULT_DB = Path("/var/lib/edgefleet-collector/fleet.db")  # systemd/edgefleet-collector.service's
DB_ENV = "EDGEFLEET_COLLECTOR_DB"  # overrides DEFAULT_DB (a collector elsewhere, or tests)
SAMPLE_TOPICS = 16  # per-device topics read one by one to confirm a suspected cut (about 0.3 s)
INFLIGHT_DEFAULT = 20  # mosquitto's max_inflight_messages: a cut burst holds the queue limit plus these


def collect_state(
    session: Bus,
    model: str | None = None,
    trusted: Mapping[str, Ed25519PublicKey] | None = None,
    quiet_s: float = 0.3,
    timeout_s: float = 10.0,
) -> FleetState:
    """Read the retained fleet state (for one model, or all); with ``trusted``, manifests must verify.

    ``FleetState.cut`` says why the burst looks cut (see the module docstring); empty if it looks whole.
    """
    topics = session.topics
    raw = session.collect_retained(state_filters(topics, model), quiet_s=quiet_s, timeout_s=timeout_s)
    state = parse_state(raw, topics, trusted)
    state.arrived = len(raw)
    manifests = session.collect_retained([topics.all_manifests()], quiet_s=quiet_s, timeout_s=timeout_s)
    lost = {t: p for t, p in manifests.items() if t not in raw}
    if lost:
        # Keep them: an unknown model's error must still list what is published.
        extra = parse_state(lost, topics, trusted)
        state.manifests.update(extra.manifests)
        state.skipped += extra.skipped
    state.cut = burst_problems(raw, manifests, state)
    if not state.cut:
        sample = sample_topics(state, topics, model)
        if sample:
            found = session.collect_retained(sample, quiet_s=quiet_s, timeout_s=timeout_s)
            missing = sorted(t for t in found if t not in raw)
            if missing:
                state.cut.append(
                    f"{len(missing)} of {len(sample)} per-device topics read one by one exist but were "
                    f"not in the burst (first: {missing[0]})"
                )
    return state


def state_filters(topics: wire.Topics, model: str | None = None) -> list[str]:
    """The subscriptions that read the retained state of one model (or of all), manifests last.

    Last, because mosquitto queues a SUBSCRIBE's retained messages filter by filter and drops the tail
    once its queue is full: missing manifests are how :func:`collect_state` sees a cut.
    """
    ns = topics.ns
    if model is not None:
        wire.check_id(model, "model")
        return [
            topics.all_statuses(),
            f"{ns}/devices/+/reports/{model}",
            f"{ns}/devices/+/assign/{model}",
            topics.all_manifests(),  # every model's: an unknown model's error lists the published ones
        ]
    return [
        topics.all_statuses(),
        topics.all_reports(),
        f"{ns}/devices/+/assign/+",
        topics.all_manifests(),
    ]


def _round_limit(n: int) -> bool:
    """Whether ``n`` messages looks like a queue limit: a round number, or one plus the in-flight window."""
    return any(k >= 100 and k % 100 == 0 for k in (n, n - INFLIGHT_DEFAULT))


def burst_problems(raw: Mapping[str, bytes], manifests: Mapping[str, bytes], state: FleetState) -> list[str]:
    """Why the burst ``raw`` looks cut, given the manifests read on their own (pure; empty: looks whole)."""
    problems: list[str] = []
    lost = [t for t in manifests if t not in raw]
    if lost:
        problems.append(
            f"{len(lost)} of {len(manifests)} manifest(s), subscribed last, exist but never arrived"
        )
        return problems
    if manifests:
        # Every manifest arrived, so everything queued before them did: mosquitto drops only the tail.
        return problems
    if _round_limit(len(raw)):
        problems.append(
            f"it stopped at {len(raw)} messages, a typical queue limit (mosquitto's default: "
            f"max_queued_messages 1000 + {INFLIGHT_DEFAULT} in flight)"
        )
    named = {d for d, _ in state.reports} | {d for d, _ in state.assignments}
    orphans = sorted(named - set(state.statuses))
    if orphans:
        problems.append(
            f"{len(orphans)} device(s) have a report or assignment but no status ({orphans[0]}, ...)"
        )
    return problems


def sample_topics(state: FleetState, topics: wire.Topics, model: str | None = None) -> list[str]:
    """Per-device topics the burst suggests exist but did not bring (at most :data:`SAMPLE_TOPICS`):
    the status of a device known only from a report or assignment, the report of a device with a status.
    """
    known = {d for d, _ in state.reports} | {d for d, _ in state.assignments}
    wanted = [topics.status(d) for d in sorted(known - set(state.statuses))]
    for device, status in sorted(state.statuses.items()):
        if len(wanted) >= SAMPLE_TOPICS:
            break
        models = [model] if model is not None else list(status.models)
        wanted += [topics.report(device, m) for m in models if (device, m) not in state.reports]
    return wanted[:SAMPLE_TOPICS]


def default_db() -> Path:
    """The SQLite file at ``$EDGEFLEET_COLLECTOR_DB``, else :data:`DEFAULT_DB` (for code that needs a
    file; :func:`default_store` also accepts a URL there)."""
    env = os.environ.get(DB_ENV)
    return Path(env) if env else DEFAULT_DB


def default_store() -> Path | str:
    """Where the commands look for the collector's store when given neither --db nor --from-broker:
    ``$EDGEFLEET_COLLECTOR_DB`` (a path or a URL such as ``postgresql://...``), else :data:`DEFAULT_DB`."""
    env = os.environ.get(DB_ENV, "").strip()
    from deploy.observe.store_sql import is_url, parse_db_url

    if not is_url(env):
        return default_db()
    return parse_db_url(env).path or env  # sqlite:///PATH is a file: read only when it exists


def choose_db(db: Path | str | None, from_broker: bool) -> tuple[Path | str | None, str]:
    """(store to read, or None for the broker; a line saying which and why, or "").

    ``--db`` wins; ``--from-broker`` forces the broker's retained burst (lab mode); otherwise the
    collector's store at :func:`default_store`: a URL always (reaching it is the check), a file when it
    exists. No store and no ``--from-broker``: StateError — reading the broker is never implicit, since
    its retained burst can be cut and the commands would decide on part of the fleet.
    """
    if db is not None:
        return db, ""
    if from_broker:
        return None, ""
    path = default_store()
    if isinstance(path, Path) and not path.is_file():
        raise StateError(
            f"no collector store at {path}: run `edgefleet collect` (it stores what the fleet says) or "
            f"pass --db URL (or set ${DB_ENV}); --from-broker reads the broker's retained messages "
            "instead (lab mode, without a collector)"
        )
    from deploy.observe.store import FleetStore

    with FleetStore(path, readonly=True) as store:
        last = store.last_received()
        where = store.source
    age = "never written" if last is None else f"last write {max(0.0, time.time() - last):.0f} s ago"
    return path, f"reading the collector database {where} ({age}); --from-broker reads the broker instead"


def state_from_store(
    path: Path | str,
    model: str | None = None,
    trusted: Mapping[str, Ed25519PublicKey] | None = None,
) -> FleetState:
    """The same FleetState from the collector's database (``edgefleet collect --db``).

    Statuses, latest reports, manifests and assignments as the collector stored them; the payloads are
    decoded (and manifests verified, with ``trusted``) exactly as :func:`parse_state` does.
    """
    from deploy.observe.store import FleetStore, parse_db_url

    url = parse_db_url(path)  # a path, sqlite:///PATH or postgresql://...
    if url.path is not None and not url.path.exists():
        raise StateError(
            f"collector database {url.path} does not exist (run `edgefleet collect --db {url.path}`)"
        )
    topics = wire.Topics()  # the store keeps no topics: rebuilt here only to share parse_state
    with FleetStore(path, readonly=True) as store:
        raw = store.retained_payloads(topics, model)
    state = parse_state(raw, topics, trusted)
    state.source = url.display
    return state


def parse_state(
    raw: Mapping[str, bytes], topics: wire.Topics, trusted: Mapping[str, Ed25519PublicKey] | None = None
) -> FleetState:
    """Decode retained payloads by topic into a FleetState (pure; used by collect_state and tests)."""
    state = FleetState()
    for topic, payload in raw.items():
        try:
            # wire's one decoder; as before, only manifests are verified here (assignments are read
            # back as this host published them)
            keys = trusted if topic.endswith("/manifest") else None
            decoded = wire.decode_inbound(topics, topic, payload, trusted=keys)
        except wire.IdentifierError:
            continue  # not a topic of the contract
        except wire.WireError as err:
            state.skipped.append(f"{_topic_text(topics.parse(topic))}: {err}")
            continue
        parsed, msg = decoded.topic, decoded.message
        if isinstance(msg, wire.Manifest) and parsed.model:
            state.manifests[parsed.model] = msg
        elif isinstance(msg, wire.Status) and parsed.device:
            state.statuses[parsed.device] = msg
        elif isinstance(msg, wire.Report) and parsed.device and parsed.model:
            state.reports[(parsed.device, parsed.model)] = msg
        elif isinstance(msg, wire.Assignment) and parsed.device and parsed.model:
            state.assignments[(parsed.device, parsed.model)] = msg
    return state


def _topic_text(parsed: wire.ParsedTopic) -> str:
    parts = [parsed.kind.value, parsed.device or "", parsed.model or "", parsed.sha256 or ""]
    return "/".join(p for p in parts if p)
