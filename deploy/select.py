"""Choose one variant per device from its benchmark report, under an operator policy. Pure: no I/O.

``select(manifest, reports, statuses, policy)`` returns one :class:`Decision` per device that reported
on this manifest's model *and* version. A decision names the chosen variant (or ``None``: keep what the
device runs now), says why, and for every other variant why it lost.

Policy (TOML, every key optional)::

    name = "lab"                   # shown in assignments; defaults to the file's stem

    [default]                      # applies to every device
    objective = "accuracy"         # "accuracy" | "latency" | "energy"
    accuracy_source = "host"       # "host" | "device": which accuracy the two limits below and the
                                   # accuracy objective use (see "Accuracy" below)
    max_accuracy_drop = 0.05       # vs the float32 baseline (fraction: 0.05 = 5 points)
    min_accuracy = 0.90            # fraction
    max_p95_ms = 50                # device latency percentiles, milliseconds
    max_p99_ms = 80
    max_energy_mj = 5.0            # energy per inference, millijoules (a variant with no figure fails it)
    max_peak_rss_mb = 200          # peak RSS of the benchmark child, MiB
    reject_throttled = false       # true: a run during which the CPU throttled does not count

    [classes.fast]                 # devices whose Status.device_class is "fast"
    objective = "latency"          # keys given here replace the default's; the others are inherited
    min_accuracy = 0.90
    max_p95_ms = 50

How a decision is made, per device:

1. The rule is ``default`` overlaid with ``classes.<device_class>`` when the class has one.
2. Per variant, the report's results for that variant *and its sha256* are taken. A report may hold
   several results per variant (one per thread count): the successful one with the lowest p50 latency
   counts. No successful result: the variant lost with ``failed: <ERROR CODE>``. Not in the report:
   ``not benchmarked``.
3. Hard constraints, in order: bench ok, runtime at least the variant's ``min_runtime``, not throttled
   (if asked), ``max_p95_ms``, ``max_p99_ms``, ``max_accuracy_drop``, ``min_accuracy``,
   ``max_energy_mj``, ``max_peak_rss_mb``. A constraint on a figure the variant lacks fails it.
4. Among the variants left, the objective ranks:
   * ``accuracy``: highest host accuracy, ties by higher top-1 agreement with float32 (the variant most
     faithful to the trained model), then lower p95 latency, then lower energy;
   * ``latency``: lowest p50 latency, ties by lower p95, then higher accuracy;
   * ``energy``: lowest energy per inference, ties by lower p50, then higher accuracy.
   Remaining ties go to the smaller file, then the variant id (decisions are deterministic).
5. Nothing left: the decision keeps the current variant (``variant=None``) and says why.

Accuracy, by ``accuracy_source``:

* ``host`` (default): the compressor's figure, measured on the .tflite file on held-out data; the drop
  is against the baseline's host figure. The same for every device, so judged once per variant.
* ``device``: the device's own, measured on the bundle's evaluation sample by its runtime
  (``BenchResult.accuracy``); the drop is against the same device's figure for the float32 baseline
  on the same rows, or, when the baseline has no successful result there, against the host's figure for
  the baseline on those rows (``sample_accuracy``). A variant without an on-device figure fails a limit
  on it. Sentences then say "on-device accuracy". The sample is small (its size is in the manifest's
  ``eval_samples``): use it to catch a runtime that computes differently, not for fine ranking.

Either way, a device whose outputs differ from the host's beyond tolerance reports
``ACCURACY_MISMATCH`` and the variant fails in step 2.

Energy figures in decisions carry the method's honesty: a figure from the utilisation model
(``energy.measured`` false) is printed as ``1.2 mJ (modelled)``, never as a plain measurement.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent import wire
from deploy.errors import PolicyError

Objective = Literal["accuracy", "latency", "energy"]
AccuracySource = Literal["host", "device"]
_MIB = 1024 * 1024
_INF = math.inf


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """Hard constraints and an objective (see the module docstring)."""

    objective: Objective = "accuracy"
    accuracy_source: AccuracySource = Field(
        default="host",
        description="host: the compressor's, on held-out data; device: each device's own, on the sample",
    )
    max_p95_ms: float | None = Field(default=None, gt=0, description="p95 latency on the device, ms")
    max_p99_ms: float | None = Field(default=None, gt=0, description="p99 latency on the device, ms")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1, description="baseline accuracy minus this variant's (fraction)"
    )
    min_accuracy: float | None = Field(default=None, ge=0, le=1, description="accuracy (fraction)")
    max_energy_mj: float | None = Field(default=None, gt=0, description="energy per inference, mJ")
    max_peak_rss_mb: float | None = Field(default=None, gt=0, description="peak RSS of the bench child, MiB")
    reject_throttled: bool = Field(default=False, description="a throttled run does not count")


class Policy(_Strict):
    name: str = Field(default="default", min_length=1, max_length=200)
    default: Rule = Field(default_factory=Rule)
    classes: dict[wire.Identifier, Rule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _limits_can_all_matter(self) -> Self:
        """A rule (after a class's overlay) whose p99 limit is below its p95 limit is a mistake: p99 is
        never below p95, so the p95 limit could never decide anything (swapped values, most likely)."""
        for where, rule in self.rules():
            if (
                rule.max_p95_ms is not None
                and rule.max_p99_ms is not None
                and rule.max_p99_ms < rule.max_p95_ms
            ):
                raise ValueError(
                    f"{where}: max_p99_ms {rule.max_p99_ms:g} is below max_p95_ms {rule.max_p95_ms:g}; "
                    "a p99 is never below its p95, so the p95 limit could never matter (swapped?)"
                )
        return self

    def rules(self) -> list[tuple[str, Rule]]:
        """Every rule a device can get, named as in the file: the default, then each class overlaid."""
        return [("default", self.default)] + [
            (f"classes.{c}", self.rule_for(c)) for c in sorted(self.classes)
        ]

    def rule_for(self, device_class: str | None) -> Rule:
        override = self.classes.get(device_class) if device_class else None
        if override is None:
            return self.default
        # Only the keys the class sets replace the default's (pydantic records which were given).
        return self.default.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], name: str = "default", source: str = "policy") -> Policy:
        """Validate a parsed TOML/JSON document; PolicyError names the offending key."""
        data = dict(data)
        data.setdefault("name", name)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise PolicyError(_explain(err, source)) from err


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            last = str(e["loc"][-1])
            fields = Policy.model_fields if len(e["loc"]) == 1 else Rule.model_fields
            guess = difflib.get_close_matches(last, list(fields), n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            lines.append(f"{source}: unknown key {loc!r}{hint}")
        elif not loc:  # a check across keys (model validator): its message names them
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: {loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def load_policy(path: Path | str | None) -> Policy:
    """Load a TOML policy file; ``None`` gives the built-in default (objective accuracy, no limits)."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PolicyError(f"policy file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"cannot read policy file {path}: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{path} is not valid TOML: {err}") from err
    return Policy.from_mapping(data, name=path.stem, source=str(path))


# --------------------------------------------------------------------------------------------------------
# Decisions
#
# Plain frozen dataclasses, not pydantic models: a decision is computed here from validated inputs, never
# parsed, and a fleet of 10,000 devices makes 10,000 of them per selection (validation was a fifth of it).


class Candidate(NamedTuple):
    """The figures a decision was based on, for one variant (a named tuple: built once per eligible
    variant per device, it is six times cheaper than a frozen dataclass)."""

    variant: str
    accuracy: float | None = None  # the figure the policy judged: see accuracy_source
    accuracy_drop: float | None = None  # against the float32 baseline, same source
    agreement: float | None = None  # host top-1 agreement with float32
    size_bytes: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    energy_mj: float | None = None
    energy_measured: bool | None = None  # false: from a utilisation model, not a sensor
    energy_method: str | None = None
    peak_rss_mb: float | None = None
    threads: int | None = None
    accuracy_source: AccuracySource = "host"


@dataclass(frozen=True, slots=True)
class Decision:
    device: str
    model: str
    manifest_version: int
    policy: str
    objective: Objective
    why: str
    device_class: str | None = None
    current: str | None = None  # variant active on the device now
    variant: str | None = None  # chosen variant; None keeps the current one
    sha256: str | None = None
    lost: dict[str, str] = field(default_factory=dict)  # variant id -> why it was not chosen
    chosen: Candidate | None = None

    @property
    def changes(self) -> bool:
        return self.variant is not None and self.variant != self.current

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` takes it as is)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lost"] = dict(self.lost)
        out["chosen"] = self.chosen._asdict() if self.chosen is not None else None
        return out


@dataclass(frozen=True, slots=True)
class _Base:
    """What a variant's evaluation takes from the manifest alone (computed once per ``select``)."""

    variant: wire.Variant
    id: str
    sha256: str
    size: int
    min_runtime: str | None
    accuracy: float | None
    accuracy_drop: float | None
    agreement: float | None
    # Rank-key places (see _accuracy_place); unknown agreement is not penalised.
    accuracy_place: float
    agreement_place: float


def _prepare(manifest: wire.Manifest) -> list[_Base]:
    base = manifest.variant(manifest.baseline)
    out = []
    for v in manifest.variants:
        acc = v.metrics.accuracy
        drop = v.metrics.accuracy_drop
        if drop is None and acc is not None and base.metrics.accuracy is not None:
            drop = base.metrics.accuracy - acc
        agreement = 1.0 if v.id == manifest.baseline else v.metrics.agreement
        acc_place = _accuracy_place(acc)
        agree_place = round(-agreement, 9) if agreement is not None else -1.0
        out.append(
            _Base(v, v.id, v.sha256, v.size, v.min_runtime, acc, drop, agreement, acc_place, agree_place)
        )
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _mj(x: float | None, measured: bool | None, per: str = "") -> str:
    """An energy figure; one that is not known to be measured says "(modelled)"."""
    if x is None:
        return "n/a"
    return f"{_fmt(x)} mJ" + (f"/{per}" if per else "") + ("" if measured else " (modelled)")


def _pts(x: float) -> str:
    return f"{x * 100:.1f}".rstrip("0").rstrip(".")


def _best_result(results: list[wire.BenchResult], sha256: str) -> wire.BenchResult | None:
    """Among the successful results for file ``sha256``: the lowest (p50, p95, threads); first of equals."""
    best: wire.BenchResult | None = None
    best_key: tuple[float, float, int] | None = None
    for r in results:
        lat = r.latency_ms
        if r.ok and lat is not None and r.sha256 == sha256:
            key = (lat.p50, lat.p95, r.threads)
            if best_key is None or key < best_key:
                best, best_key = r, key
    return best


def _unusable(b: _Base, results: list[wire.BenchResult]) -> str:
    """Why no result in ``results`` (the report's, for ``b``) counts."""
    same = [r for r in results if r.sha256 == b.sha256]
    if not same:
        return f"benchmarked another file (sha {results[0].sha256[:12]})"
    codes = sorted({r.error.value for r in same if r.error is not None}) or ["unknown"]
    return f"failed: {', '.join(codes)}"


def _candidate(
    b: _Base, r: wire.BenchResult, accuracy: float | None, drop: float | None, source: AccuracySource
) -> Candidate:
    lat = r.latency_ms
    assert lat is not None  # a successful result has latency figures (wire validator)
    energy = r.energy
    rss = r.peak_rss_bytes
    if energy is None:
        mj = measured = method = None
    else:
        mj, measured, method = energy.mj_per_inference, energy.measured, energy.method.value
    return Candidate(
        b.id,
        accuracy,
        drop,
        b.agreement,
        b.size,
        lat.p50,
        lat.p95,
        lat.p99,
        mj,
        measured,
        method,
        rss / _MIB if rss is not None else None,
        r.threads,
        source,
    )


Supports = dict[tuple[str, str, str], str | None]


def _runtime_refusal(runtime: wire.RuntimeInfo, min_runtime: str, cache: Supports) -> str | None:
    """Why ``runtime`` cannot run a file needing ``min_runtime`` (None: it can), cached per select."""
    key = (runtime.name, runtime.version, min_runtime)
    if key not in cache:
        cache[key] = (
            None
            if wire.runtime_supports(runtime, min_runtime)
            else f"needs TFLite runtime >= {min_runtime}, device has {runtime.name} "
            f"{runtime.version} (TFLite {wire.tflite_version(runtime)})"
        )
    return cache[key]


# A variant's hard constraints, in the order the module docstring gives (the first broken one is shown).
# Each returns None quickly when the constraint holds; sentences are made only for failures.


def _run_violation(r: wire.BenchResult, lat: wire.LatencyStats, rule: Rule) -> str | None:
    """Throttling and the latency limits, from the device's result."""
    if rule.reject_throttled and r.throttled:
        return "CPU throttled during the benchmark"
    if rule.max_p95_ms is not None and lat.p95 > rule.max_p95_ms:
        return f"p95 {_fmt(lat.p95)} ms > max {_fmt(rule.max_p95_ms)} ms"
    if rule.max_p99_ms is not None and lat.p99 > rule.max_p99_ms:
        return f"p99 {_fmt(lat.p99)} ms > max {_fmt(rule.max_p99_ms)} ms"
    return None


def _accuracy_violation(
    accuracy: float | None, drop: float | None, rule: Rule, source: AccuracySource
) -> str | None:
    """The accuracy limits, on the figures of ``source`` (host ones are judged once per rule and variant)."""
    what, figure = ("accuracy", "host accuracy") if source == "host" else ("on-device accuracy",) * 2
    if rule.max_accuracy_drop is not None:
        if drop is None:
            return f"no {figure} to compare with the baseline"
        if drop > rule.max_accuracy_drop + 1e-12:
            return f"{what} drop {_pts(drop)} pts > max {_pts(rule.max_accuracy_drop)}"
    if rule.min_accuracy is not None:
        if accuracy is None:
            return f"no {figure}"
        if accuracy < rule.min_accuracy - 1e-12:
            return f"{what} {accuracy:.4g} < min {rule.min_accuracy:.4g}"
    return None


def _resource_violation(r: wire.BenchResult, rule: Rule) -> str | None:
    """Energy per inference and peak memory, from the device's result."""
    if rule.max_energy_mj is not None:
        if r.energy is None:
            return "no energy figure"
        if r.energy.mj_per_inference > rule.max_energy_mj:
            shown = _mj(r.energy.mj_per_inference, r.energy.measured)
            return f"energy {shown} > max {_fmt(rule.max_energy_mj)} mJ"
    if rule.max_peak_rss_mb is not None:
        if r.peak_rss_bytes is None:
            return "no peak memory figure"
        if r.peak_rss_bytes / _MIB > rule.max_peak_rss_mb:
            return f"peak RSS {_fmt(r.peak_rss_bytes / _MIB)} MiB > max {_fmt(rule.max_peak_rss_mb)} MiB"
    return None


RankKey = tuple[float, ...]


def _accuracy_place(accuracy: float | None) -> float:
    """Rank-key place of an accuracy (smaller ranks first), rounded so that float noise in how a ratio
    was computed does not break a tie; unknown accuracy ranks last."""
    return round(-accuracy, 9) if accuracy is not None else _INF


def _rank_key(accuracy_place: float, b: _Base, c: Candidate, objective: Objective) -> RankKey:
    """Smaller ranks first: the objective's places (see the module docstring), then the file size.

    Exact ties after that go to the variant id (see :meth:`_Selector.decide`).
    """
    energy = c.energy_mj if c.energy_mj is not None else _INF
    if objective == "accuracy":
        return (accuracy_place, b.agreement_place, c.p95_ms or 0.0, energy, c.size_bytes)
    if objective == "latency":
        return (c.p50_ms or 0.0, c.p95_ms or 0.0, accuracy_place, c.size_bytes)
    return (energy, c.p50_ms or 0.0, accuracy_place, c.size_bytes)


def _show_acc(c: Candidate) -> str:
    return "n/a" if c.accuracy is None else f"{c.accuracy:.4g}"


def _show_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{_fmt(x)} ms"


def _show_agree(c: Candidate) -> str:
    return "n/a" if c.agreement is None else f"{c.agreement:.4g}"


_CRITERIA: dict[str, tuple[str, Callable[[Candidate], str]]] = {
    "accuracy": ("lower accuracy", _show_acc),
    "on-device accuracy": ("lower on-device accuracy", _show_acc),
    "agreement": ("lower agreement with float32", _show_agree),
    "p50": ("higher p50", lambda c: _show_ms(c.p50_ms)),
    "p95": ("higher p95", lambda c: _show_ms(c.p95_ms)),
    "energy": ("higher energy", lambda c: _mj(c.energy_mj, c.energy_measured)),
}
_ORDER: dict[str, list[str]] = {
    "accuracy": ["accuracy", "agreement", "p95", "energy"],
    "latency": ["p50", "p95", "accuracy"],
    "energy": ["energy", "p50", "accuracy"],
}


def _reasons(order: list[str]) -> list[tuple[str, Callable[[Candidate], str], str, str]]:
    """Per criterion of ``order``: (label, how to show a figure, comparison sign, prefix)."""
    return [
        (
            _CRITERIA[name][0],
            _CRITERIA[name][1],
            "<" if name in ("accuracy", "on-device accuracy", "agreement") else ">",
            "" if i == 0 else "tie on " + ", ".join(order[:i]) + "; ",
        )
        for i, name in enumerate(order)
    ]


_REASONS: dict[tuple[str, str], list[tuple[str, Callable[[Candidate], str], str, str]]] = {
    (objective, source): _reasons(
        [("on-device accuracy" if n == "accuracy" and source == "device" else n) for n in order]
    )
    for objective, order in _ORDER.items()
    for source in ("host", "device")
}


def _lost_to(loser: Candidate, winner: Candidate, objective: Objective, lk: RankKey, wk: RankKey) -> str:
    """Why ``loser`` ranked below ``winner`` under ``objective`` (the first differing criterion).

    ``lk``, ``wk``: their :func:`_rank_key` under ``objective``.
    """
    reasons = _REASONS[objective, winner.accuracy_source]
    for i, (label, show, sep, prefix) in enumerate(reasons):
        if lk[i] != wk[i]:
            return f"{prefix}{label} {show(loser)} {sep} {show(winner)} ({winner.variant})"
    if lk[len(reasons)] != wk[len(reasons)]:
        return f"tie; larger file {loser.size_bytes} B > {winner.size_bytes} B ({winner.variant})"
    return f"tie with {winner.variant}; chosen by id order"


_BEST_OF = {"accuracy": "highest accuracy", "latency": "lowest latency", "energy": "lowest energy"}


def _why_chosen(w: Candidate, objective: Objective, n_ok: int, policy: str, where: str) -> str:
    on_device = "on-device " if w.accuracy_source == "device" else ""
    best = _BEST_OF[objective].replace("accuracy", f"{on_device}accuracy")
    figures = []
    if w.accuracy is not None:
        figures.append(f"{on_device}accuracy {w.accuracy:.4g}")
    if w.p50_ms is not None and w.p95_ms is not None:
        figures.append(f"p50 {_fmt(w.p50_ms)} ms, p95 {_fmt(w.p95_ms)} ms")
    if w.energy_mj is not None:
        figures.append(_mj(w.energy_mj, w.energy_measured, per="inference"))
    if w.threads is not None:
        figures.append(f"{w.threads} thread(s)")
    return f"{best} of {n_ok} variant(s) meeting policy {policy!r} ({where}): " + "; ".join(figures)


def unreachable_rules(policy: Policy, manifest: wire.Manifest) -> list[str]:
    """The rules of ``policy`` no variant of ``manifest`` can meet, whatever devices report: one line each.

    Only host accuracy is known before devices report, so this catches accuracy limits (with
    ``accuracy_source = "host"``) that every variant fails, such as a ``min_accuracy`` above the best
    variant's accuracy: such a rule would keep every device of its class on its current model.
    """
    bases = _prepare(manifest)
    problems = []
    for where, rule in policy.rules():
        if rule.accuracy_source != "host":
            continue
        verdicts = {b.id: _accuracy_violation(b.accuracy, b.accuracy_drop, rule, "host") for b in bases}
        if all(v is not None for v in verdicts.values()):
            why = "; ".join(f"{vid}: {v}" for vid, v in verdicts.items())
            problems.append(
                f"policy {policy.name!r} {where}: no variant of {manifest.model} v{manifest.version} "
                f"meets its accuracy limits ({why})"
            )
    return problems


def decide(
    manifest: wire.Manifest, report: wire.Report, status: wire.Status | None, policy: Policy
) -> Decision:
    """The decision for one device (its report must be for this manifest's model and version)."""
    return _Selector(manifest, policy).decide(report, status)


@dataclass(frozen=True, slots=True)
class _Rule:
    """A policy rule with its verdict on each variant's host accuracy (by id; None: the variant passes)."""

    rule: Rule
    host_accuracy: dict[str, str | None]


class _Selector:
    """One manifest and policy; caches what every device's decision shares (bases, rules, runtime checks).

    Per device, most variants pass or fail on a few comparisons: sentences (why a variant failed or lost)
    and :class:`Candidate` objects are made only where a decision shows them.
    """

    def __init__(self, manifest: wire.Manifest, policy: Policy) -> None:
        self.manifest = manifest
        self.policy = policy
        self.bases = _prepare(manifest)
        self.baseline = next(b for b in self.bases if b.id == manifest.baseline)
        self.rules: dict[str | None, _Rule] = {}
        self.supports: Supports = {}

    def rule_for(self, device_class: str | None) -> _Rule:
        rule = self.rules.get(device_class)
        if rule is None:
            policy_rule = self.policy.rule_for(device_class)
            host = {
                b.id: _accuracy_violation(b.accuracy, b.accuracy_drop, policy_rule, "host")
                for b in self.bases
            }
            rule = self.rules[device_class] = _Rule(policy_rule, host)
        return rule

    def device_baseline_accuracy(
        self, by_variant: dict[str, wire.BenchResult], several: dict[str, list[wire.BenchResult]]
    ) -> float | None:
        """The float32 baseline's on-device accuracy in this report, else the host's on the same rows."""
        b = self.baseline
        results = several.get(b.id) or ([by_variant[b.id]] if b.id in by_variant else [])
        best = _best_result(results, b.sha256)
        if best is not None and best.accuracy is not None:
            return best.accuracy
        return b.variant.reference_accuracy

    def decide(self, report: wire.Report, status: wire.Status | None) -> Decision:
        manifest, policy = self.manifest, self.policy
        device_class = status.device_class if status else None
        checks = self.rule_for(device_class)
        rule = checks.rule
        objective = rule.objective
        model_status = status.models.get(manifest.model) if status else None
        active = model_status.active if model_status else None
        current = active.variant if active else None
        status_runtime = status.runtime if status else None

        by_variant = {r.variant: r for r in report.results}
        several: dict[str, list[wire.BenchResult]] = {}
        if len(by_variant) != len(report.results):  # several results for a variant (a thread sweep)
            for r in report.results:
                several.setdefault(r.variant, []).append(r)

        source = rule.accuracy_source
        baseline_accuracy = self.device_baseline_accuracy(by_variant, several) if source == "device" else None
        lost: dict[str, str] = {}
        eligible: list[tuple[RankKey, str, Candidate, _Base]] = []
        for b in self.bases:
            vid = b.id
            best = by_variant.get(vid)
            if best is None:
                lost[vid] = "not benchmarked"
                continue
            if vid in several:
                best = _best_result(several[vid], b.sha256)
            elif not best.ok or best.sha256 != b.sha256:
                best = None
            if best is None:
                lost[vid] = _unusable(b, several.get(vid) or [by_variant[vid]])
                continue
            lat = best.latency_ms
            assert lat is not None  # a successful result has latency figures (wire validator)
            runtime = best.runtime or status_runtime
            if runtime is not None and b.min_runtime is not None:
                refusal = _runtime_refusal(runtime, b.min_runtime, self.supports)
                if refusal is not None:
                    lost[vid] = refusal
                    continue
            if source == "host":
                accuracy, drop, place = b.accuracy, b.accuracy_drop, b.accuracy_place
                accuracy_failure = checks.host_accuracy[vid]
            else:
                accuracy, place = best.accuracy, _accuracy_place(best.accuracy)
                drop = (
                    baseline_accuracy - accuracy
                    if baseline_accuracy is not None and accuracy is not None
                    else None
                )
                accuracy_failure = _accuracy_violation(accuracy, drop, rule, source)
            failure = _run_violation(best, lat, rule) or accuracy_failure or _resource_violation(best, rule)
            if failure is not None:
                lost[vid] = failure
                continue
            cand = _candidate(b, best, accuracy, drop, source)
            eligible.append((_rank_key(place, b, cand, objective), vid, cand, b))

        where = f"class {device_class}" if device_class in policy.classes else "default rule"
        chosen: Candidate | None = None
        sha256: str | None = None
        if not eligible:
            keep = f"keeping the current variant {current}" if current else "keeping the current model"
            why = f"no variant meets policy {policy.name!r} ({where}): {keep}"
        else:
            eligible.sort(key=lambda e: e[:2])  # the variant id settles exact ties
            wk, _, chosen, wb = eligible[0]
            sha256 = wb.sha256
            for lk, vid, cand, _b in eligible[1:]:
                lost[vid] = _lost_to(cand, chosen, objective, lk, wk)
            why = _why_chosen(chosen, objective, len(eligible), policy.name, where)
        if len(lost) > 1:
            lost = {b.id: lost[b.id] for b in self.bases if b.id in lost}  # manifest order
        return Decision(
            report.device,
            manifest.model,
            manifest.version,
            policy.name,
            objective,
            why,
            device_class,
            current,
            chosen.variant if chosen is not None else None,
            sha256,
            lost,
            chosen,
        )


def select(
    manifest: wire.Manifest,
    reports: Mapping[str, wire.Report],
    statuses: Mapping[str, wire.Status],
    policy: Policy,
) -> list[Decision]:
    """One decision per device whose report is for ``manifest.model`` at ``manifest.version``, by device."""
    selector = _Selector(manifest, policy)
    out = []
    for device in sorted(reports):
        report = reports[device]
        if report.model != manifest.model or report.manifest_version != manifest.version:
            continue
        out.append(selector.decide(report, statuses.get(device)))
    return out
