"""Choose one variant per device from its benchmark report, under an operator policy. Pure: no I/O.

``select(manifest, reports, statuses, policy)`` returns one :class:`Decision` per device that reported
on this manifest's model *and* version. A decision names the chosen variant (or ``None``: keep what the
device runs now), says why, and for every other variant why it lost.

Policy (TOML, every key optional)::

    name = "lab"                   # shown in assignments; defaults to the file's stem

    [default]                      # applies to every device
    objective = "accuracy"         # "accuracy" | "latency" | "energy"
    max_accuracy_drop = 0.05       # vs the float32 baseline's host accuracy (fraction: 0.05 = 5 points)
    min_accuracy = 0.90            # host accuracy, fraction
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

Accuracy is the host's (measured on the .tflite file on held-out data); a device whose runtime gives
wrong outputs reports ``ACCURACY_MISMATCH`` and the variant fails in step 2.

Energy figures in decisions carry the method's honesty: a figure from the utilisation model
(``energy.measured`` false) is printed as ``1.2 mJ (modelled)``, never as a plain measurement.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import wire
from deploy.errors import PolicyError

Objective = Literal["accuracy", "latency", "energy"]
_MIB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """Hard constraints and an objective (see the module docstring)."""

    objective: Objective = "accuracy"
    max_p95_ms: float | None = Field(default=None, gt=0, description="p95 latency on the device, ms")
    max_p99_ms: float | None = Field(default=None, gt=0, description="p99 latency on the device, ms")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1, description="baseline host accuracy minus this variant's (fraction)"
    )
    min_accuracy: float | None = Field(default=None, ge=0, le=1, description="host accuracy (fraction)")
    max_energy_mj: float | None = Field(default=None, gt=0, description="energy per inference, mJ")
    max_peak_rss_mb: float | None = Field(default=None, gt=0, description="peak RSS of the bench child, MiB")
    reject_throttled: bool = Field(default=False, description="a throttled run does not count")


class Policy(_Strict):
    name: str = Field(default="default", min_length=1, max_length=200)
    default: Rule = Field(default_factory=Rule)
    classes: dict[wire.Identifier, Rule] = Field(default_factory=dict)

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


class Candidate(_Strict):
    """The figures a decision was based on, for one variant."""

    variant: str
    accuracy: float | None = None
    accuracy_drop: float | None = None
    agreement: float | None = Field(default=None, description="host top-1 agreement with float32")
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    energy_mj: float | None = None
    energy_measured: bool | None = Field(
        default=None, description="false: the energy figure comes from a utilisation model, not a sensor"
    )
    energy_method: str | None = None
    peak_rss_mb: float | None = None
    threads: int | None = None
    size_bytes: int = 0


class Decision(_Strict):
    device: str
    model: str
    manifest_version: int
    device_class: str | None = None
    policy: str
    objective: Objective
    current: str | None = Field(default=None, description="variant active on the device now")
    variant: str | None = Field(default=None, description="chosen variant; None keeps the current one")
    sha256: str | None = None
    why: str
    lost: dict[str, str] = Field(default_factory=dict, description="variant id -> why it was not chosen")
    chosen: Candidate | None = None

    @property
    def changes(self) -> bool:
        return self.variant is not None and self.variant != self.current


@dataclass(slots=True)
class _Cand:
    """A variant's figures while deciding: an unvalidated :class:`Candidate` (the winner's becomes one)."""

    variant: str
    accuracy: float | None
    accuracy_drop: float | None
    agreement: float | None
    size_bytes: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    energy_mj: float | None = None
    energy_measured: bool | None = None
    energy_method: str | None = None
    peak_rss_mb: float | None = None
    threads: int | None = None

    def candidate(self) -> Candidate:
        return Candidate(
            variant=self.variant,
            accuracy=self.accuracy,
            accuracy_drop=self.accuracy_drop,
            agreement=self.agreement,
            size_bytes=self.size_bytes,
            p50_ms=self.p50_ms,
            p95_ms=self.p95_ms,
            p99_ms=self.p99_ms,
            energy_mj=self.energy_mj,
            energy_measured=self.energy_measured,
            energy_method=self.energy_method,
            peak_rss_mb=self.peak_rss_mb,
            threads=self.threads,
        )


@dataclass(slots=True)
class _Eval:
    variant: wire.Variant
    cand: _Cand
    result: wire.BenchResult | None
    failure: str | None


@dataclass(frozen=True, slots=True)
class _Base:
    """What a variant's evaluation takes from the manifest alone (computed once per ``select``)."""

    variant: wire.Variant
    accuracy: float | None
    accuracy_drop: float | None
    agreement: float | None


def _prepare(manifest: wire.Manifest) -> list[_Base]:
    base = manifest.variant(manifest.baseline)
    out = []
    for v in manifest.variants:
        acc = v.metrics.accuracy
        drop = v.metrics.accuracy_drop
        if drop is None and acc is not None and base.metrics.accuracy is not None:
            drop = base.metrics.accuracy - acc
        agreement = 1.0 if v.id == manifest.baseline else v.metrics.agreement
        out.append(_Base(v, acc, drop, agreement))
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


def _best_result(results: list[wire.BenchResult]) -> wire.BenchResult | None:
    """The successful result with the lowest (p50, p95, threads); the first of equals."""
    best: wire.BenchResult | None = None
    best_key: tuple[float, float, int] | None = None
    for r in results:
        lat = r.latency_ms
        if r.ok and lat is not None:
            key = (lat.p50, lat.p95, r.threads)
            if best_key is None or key < best_key:
                best, best_key = r, key
    return best


def _evaluate(
    b: _Base,
    results: list[wire.BenchResult],
    status: wire.Status | None,
    rule: Rule,
    supports: dict[tuple[str, str, str], str | None],
) -> _Eval:
    """``results``: the report's results for ``b.variant.id`` (in report order)."""
    v = b.variant
    if not results:
        return _Eval(
            v, _Cand(v.id, b.accuracy, b.accuracy_drop, b.agreement, v.size), None, "not benchmarked"
        )
    sha = v.sha256
    same = [r for r in results if r.sha256 == sha]
    if not same:
        cand = _Cand(v.id, b.accuracy, b.accuracy_drop, b.agreement, v.size)
        return _Eval(v, cand, None, f"benchmarked another file (sha {results[0].sha256[:12]})")
    best = same[0] if len(same) == 1 and same[0].ok and same[0].latency_ms is not None else _best_result(same)
    if best is None or best.latency_ms is None:
        codes = sorted({r.error.value for r in same if r.error is not None}) or ["unknown"]
        cand = _Cand(v.id, b.accuracy, b.accuracy_drop, b.agreement, v.size)
        return _Eval(v, cand, None, f"failed: {', '.join(codes)}")
    lat = best.latency_ms
    energy = best.energy
    rss = best.peak_rss_bytes
    cand = _Cand(
        v.id,
        b.accuracy,
        b.accuracy_drop,
        b.agreement,
        v.size,
        lat.p50,
        lat.p95,
        lat.p99,
        energy.mj_per_inference if energy is not None else None,
        energy.measured if energy is not None else None,
        energy.method.value if energy is not None else None,
        rss / _MIB if rss is not None else None,
        best.threads,
    )
    return _Eval(v, cand, best, _violation(v, cand, best, status, rule, supports))


def _violation(
    v: wire.Variant,
    c: _Cand,
    r: wire.BenchResult,
    status: wire.Status | None,
    rule: Rule,
    supports: dict[tuple[str, str, str], str | None],
) -> str | None:
    """The first hard constraint ``c`` breaks, as a sentence, or None.

    ``supports`` caches the runtime check by (runtime name, version, min_runtime): None or the failure.
    """
    runtime = r.runtime or (status.runtime if status else None)
    if runtime is not None and v.min_runtime is not None:
        key = (runtime.name, runtime.version, v.min_runtime)
        if key not in supports:
            supports[key] = (
                None
                if wire.runtime_supports(runtime, v.min_runtime)
                else f"needs TFLite runtime >= {v.min_runtime}, device has {runtime.name} "
                f"{runtime.version} (TFLite {wire.tflite_version(runtime)})"
            )
        if supports[key] is not None:
            return supports[key]
    if rule.reject_throttled and r.throttled:
        return "CPU throttled during the benchmark"
    if rule.max_p95_ms is not None and c.p95_ms is not None and c.p95_ms > rule.max_p95_ms:
        return f"p95 {_fmt(c.p95_ms)} ms > max {_fmt(rule.max_p95_ms)} ms"
    if rule.max_p99_ms is not None and c.p99_ms is not None and c.p99_ms > rule.max_p99_ms:
        return f"p99 {_fmt(c.p99_ms)} ms > max {_fmt(rule.max_p99_ms)} ms"
    if rule.max_accuracy_drop is not None:
        if c.accuracy_drop is None:
            return "no host accuracy to compare with the baseline"
        if c.accuracy_drop > rule.max_accuracy_drop + 1e-12:
            return f"accuracy drop {_pts(c.accuracy_drop)} pts > max {_pts(rule.max_accuracy_drop)}"
    if rule.min_accuracy is not None:
        if c.accuracy is None:
            return "no host accuracy"
        if c.accuracy < rule.min_accuracy - 1e-12:
            return f"accuracy {c.accuracy:.4g} < min {rule.min_accuracy:.4g}"
    if rule.max_energy_mj is not None:
        if c.energy_mj is None:
            return "no energy figure"
        if c.energy_mj > rule.max_energy_mj:
            return f"energy {_mj(c.energy_mj, c.energy_measured)} > max {_fmt(rule.max_energy_mj)} mJ"
    if rule.max_peak_rss_mb is not None:
        if c.peak_rss_mb is None:
            return "no peak memory figure"
        if c.peak_rss_mb > rule.max_peak_rss_mb:
            return f"peak RSS {_fmt(c.peak_rss_mb)} MiB > max {_fmt(rule.max_peak_rss_mb)} MiB"
    return None


_INF = math.inf


def _rank_key(c: _Cand, objective: Objective) -> tuple[float | str, ...]:
    acc = -(c.accuracy if c.accuracy is not None else -_INF)
    p50 = c.p50_ms if c.p50_ms is not None else _INF
    p95 = c.p95_ms if c.p95_ms is not None else _INF
    energy = c.energy_mj if c.energy_mj is not None else _INF
    agree = -(c.agreement if c.agreement is not None else 1.0)  # unknown agreement is not penalised
    if objective == "accuracy":
        head: tuple[float, ...] = (round(acc, 9), round(agree, 9), round(p95, 9), round(energy, 9))
    elif objective == "latency":
        head = (round(p50, 9), round(p95, 9), round(acc, 9))
    else:
        head = (round(energy, 9), round(p50, 9), round(acc, 9))
    return (*head, float(c.size_bytes), c.variant)


def _show_acc(c: _Cand) -> str:
    return "n/a" if c.accuracy is None else f"{c.accuracy:.4g}"


def _show_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{_fmt(x)} ms"


def _show_agree(c: _Cand) -> str:
    return "n/a" if c.agreement is None else f"{c.agreement:.4g}"


_CRITERIA: dict[str, tuple[str, Callable[[_Cand], str]]] = {
    "accuracy": ("lower accuracy", _show_acc),
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


def _lost_to(
    loser: _Cand,
    winner: _Cand,
    objective: Objective,
    lk: tuple[float | str, ...],
    wk: tuple[float | str, ...],
) -> str:
    """Why ``loser`` ranked below ``winner`` under ``objective`` (the first differing criterion).

    ``lk``, ``wk``: their :func:`_rank_key` under ``objective``.
    """
    order = _ORDER[objective]
    for i, name in enumerate(order):
        if lk[i] != wk[i]:
            label, show = _CRITERIA[name]
            sep = "<" if name in ("accuracy", "agreement") else ">"
            prefix = "" if i == 0 else "tie on " + ", ".join(order[:i]) + "; "
            return f"{prefix}{label} {show(loser)} {sep} {show(winner)} ({winner.variant})"
    if lk[len(order)] != wk[len(order)]:
        return f"tie; larger file {loser.size_bytes} B > {winner.size_bytes} B ({winner.variant})"
    return f"tie with {winner.variant}; chosen by id order"


def decide(
    manifest: wire.Manifest, report: wire.Report, status: wire.Status | None, policy: Policy
) -> Decision:
    """The decision for one device (its report must be for this manifest's model and version)."""
    return _decide(manifest, _prepare(manifest), report, status, policy, {}, {})


def _decide(
    manifest: wire.Manifest,
    bases: list[_Base],
    report: wire.Report,
    status: wire.Status | None,
    policy: Policy,
    rules: dict[str | None, Rule],
    supports: dict[tuple[str, str, str], str | None],
) -> Decision:
    """:func:`decide` with per-``select`` caches (the manifest's part, rules by class, runtime checks)."""
    device_class = status.device_class if status else None
    rule = rules.get(device_class)
    if rule is None:
        rule = rules[device_class] = policy.rule_for(device_class)
    model_status = status.models.get(manifest.model) if status else None
    current = model_status.active.variant if model_status and model_status.active else None
    by_variant: dict[str, list[wire.BenchResult]] = {}
    for r in report.results:
        by_variant.setdefault(r.variant, []).append(r)
    evals = [_evaluate(b, by_variant.get(b.variant.id, []), status, rule, supports) for b in bases]
    lost = {e.variant.id: e.failure for e in evals if e.failure is not None}
    keyed = sorted(
        ((_rank_key(e.cand, rule.objective), e) for e in evals if e.failure is None), key=lambda ke: ke[0]
    )
    eligible = [e for _, e in keyed]
    where = f"class {device_class}" if device_class in policy.classes else "default rule"
    common: dict[str, Any] = {
        "device": report.device,
        "model": manifest.model,
        "manifest_version": manifest.version,
        "device_class": device_class,
        "policy": policy.name,
        "objective": rule.objective,
        "current": current,
    }
    if not eligible:
        keep = f"keeping the current variant {current}" if current else "keeping the current model"
        return Decision(
            **common,
            why=f"no variant meets policy {policy.name!r} ({where}): {keep}",
            lost=lost,
        )
    winner = eligible[0]
    wk = keyed[0][0]
    for lk, e in keyed[1:]:
        lost[e.variant.id] = _lost_to(e.cand, winner.cand, rule.objective, lk, wk)
    w = winner.cand
    figures = []
    if w.accuracy is not None:
        figures.append(f"accuracy {w.accuracy:.4g}")
    if w.p50_ms is not None and w.p95_ms is not None:
        figures.append(f"p50 {_fmt(w.p50_ms)} ms, p95 {_fmt(w.p95_ms)} ms")
    if w.energy_mj is not None:
        figures.append(f"{_mj(w.energy_mj, w.energy_measured, per='inference')}")
    if w.threads is not None:
        figures.append(f"{w.threads} thread(s)")
    best_of = {"accuracy": "highest accuracy", "latency": "lowest latency", "energy": "lowest energy"}
    n_ok = len(eligible)
    why = (
        f"{best_of[rule.objective]} of {n_ok} variant(s) meeting policy {policy.name!r} ({where}): "
        + "; ".join(figures)
    )
    return Decision(
        **common,
        variant=w.variant,
        sha256=winner.variant.sha256,
        why=why,
        lost={k: lost[k] for k in (v.id for v in manifest.variants) if k in lost},
        chosen=w.candidate(),
    )


def select(
    manifest: wire.Manifest,
    reports: Mapping[str, wire.Report],
    statuses: Mapping[str, wire.Status],
    policy: Policy,
) -> list[Decision]:
    """One decision per device whose report is for ``manifest.model`` at ``manifest.version``, by device."""
    bases = _prepare(manifest)
    rules: dict[str | None, Rule] = {}
    supports: dict[tuple[str, str, str], str | None] = {}
    out = []
    for device in sorted(reports):
        report = reports[device]
        if report.model != manifest.model or report.manifest_version != manifest.version:
            continue
        out.append(_decide(manifest, bases, report, statuses.get(device), policy, rules, supports))
    return out
