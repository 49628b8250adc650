"""Choose one variant per device from its benchmark report, under an operator policy. Pure: no I/O.

``select(manifest, reports, statuses, policy)`` returns one :class:`Decision` per device that reported
on this manifest's model *and* version. A decision names the chosen variant (or ``None``: keep what the
device runs now), says why, and for every other variant why it lost.

Policy (TOML, every key optional)::

    name = "lab"                   # shown in assignments; defaults to the file's stem

    [default]                      # applies to every device
    objective = "accuracy"         # "accuracy" | "latency" | "energy" | "metric" (see step 4)
    # rank_metric = "miou"         # with objective = "metric": the named metric it ranks on (default:
                                   # the manifest's primary_metric); also breaks latency/energy ties
    accuracy_source = "host"       # "host" | "device": which accuracy the two limits below and the
                                   # accuracy objective use (see "Accuracy" below)
    max_accuracy_drop = 0.05       # vs the float32 baseline (fraction: 0.05 = 5 points)
    min_accuracy = 0.90            # fraction
    min_metric = { cosine = 0.99, miou = 0.6 }   # floors on named metrics ("higher is better" ones)
    min_sqnr_db = 25               # shorthand for min_metric.sqnr_db: any min_<metric> key
    max_metric = { max_abs = 0.05 }              # ceilings on named metrics ("lower is better" ones)
    max_drop.miou = 0.02           # per named metric, how much worse than the float32 baseline's
                                   # figure it may be, in its units (or max_drop = { miou = 0.02 })
    max_p95_ms = 50                # device latency percentiles, milliseconds
    max_p99_ms = 80
    max_energy_mj = 5.0            # energy per inference, millijoules (a variant with no figure fails it)
    max_peak_rss_mb = 200          # peak RSS of the benchmark child, MiB
    reject_throttled = false       # true: a run during which the CPU throttled does not count
    reject_contended = true        # false: also rank on runs the device published as contended

    [classes.fast]                 # devices whose Status.device_class is "fast"
    objective = "latency"          # keys given here replace the default's; the others are inherited
    min_accuracy = 0.90            # (min_metric, max_metric and max_drop merge per metric instead)
    max_p95_ms = 50

How a decision is made, per device:

1. The rule is ``default`` overlaid with ``classes.<device_class>`` when the class has one.
2. Per variant, the report's results for that variant *and its sha256* are taken. A report may hold
   several results per variant (one per thread count): the successful one with the lowest p50 latency
   counts (an uncontended one before any contended one). No successful result: the variant lost with
   ``failed: <ERROR CODE>``. Not in the report: ``not benchmarked``.
3. Hard constraints, in order: bench ok, runtime at least the variant's ``min_runtime``, not contended
   (``reject_contended``, on by default: the device said other processes disturbed the measurement, so
   its latency says nothing about the variant; explanation ``contended``), not throttled (if asked),
   ``max_p95_ms``, ``max_p99_ms``, ``max_accuracy_drop``, ``min_accuracy``, ``max_drop``, ``min_metric``,
   ``max_metric`` (each table in the order written), ``max_energy_mj``, ``max_peak_rss_mb``. A
   constraint on a figure the variant lacks fails it.
4. Among the variants left, the objective ranks:
   * ``accuracy``: highest host accuracy, ties by higher top-1 agreement with float32 (the variant most
     faithful to the trained model), then lower p95 latency, then lower energy. On a manifest without
     accuracy (a generic task: no labels) it ranks on the manifest's ``primary_metric`` instead (else
     on cosine, when the manifest names none), as ``metric`` does, and the decision says so;
   * ``metric``: best ``rank_metric`` (highest or lowest, by the metric's direction; default the
     manifest's ``primary_metric``), ties by lower p95 latency, then lower energy. A rank metric that is
     ``accuracy`` ranks exactly as objective ``accuracy``;
   * ``latency``: lowest p50 latency, ties by lower p95, then higher accuracy;
   * ``energy``: lowest energy per inference, ties by lower p50, then higher accuracy.
   The latency and energy ties use ``rank_metric`` instead of accuracy when the rule names one, and the
   same stand-in as ``accuracy`` on a manifest without accuracy. Remaining ties go to the smaller file,
   then the variant id (decisions are deterministic).
5. Nothing left: the decision keeps the current variant (``variant=None``) and says why.

Named metrics (``min_metric``, ``max_metric``, ``max_drop``, ``rank_metric``) are the manifest's host
figures, measured by the compressor on the .tflite file on held-out rows (``HostMetrics.named``):
accuracy, fidelity to the float32 baseline's outputs (cosine, sqnr_db, max_abs, top1_agreement) or a
user evaluator's metric (miou, map, ...). Which way is better comes from the manifest's ``metrics`` map,
else, for a manifest without one, from the built-in directions (accuracy, cosine, sqnr_db,
top1_agreement: higher; max_abs: lower). A floor (``min_metric`` or ``min_<name>``) is for a "higher"
metric and a ceiling (``max_metric``) for a "lower" one; ``max_drop`` is direction-aware: the baseline's
figure minus the variant's for a "higher" metric, the variant's minus the baseline's for a "lower" one,
in the metric's own units (a fraction for a 0..1 metric, printed in points; dB for ``*_db``).
``accuracy`` itself has its own keys (``min_accuracy``, ``max_accuracy_drop``), which follow
``accuracy_source``. A policy that names a metric the manifest lacks, a floor on a "lower" metric, or a
ceiling on a "higher" one is refused before anything is decided, in one line listing the manifest's
metrics; so are accuracy limits on a generic manifest without accuracy.

A device's ``BenchResult.fidelity`` (its outputs on the sample against the host's outputs of the same
file) is not one of these metrics: it is a runtime sanity check, which the agent applies itself (a
device beyond the variant's ``output_tolerance`` reports the variant failed, step 2).

Accuracy, by ``accuracy_source``:

* ``host`` (default): the compressor's figure, measured on the .tflite file on held-out data; the drop
  is against the baseline's host figure. The same for every device, so judged once per variant.
* ``device``: the device's own, measured on the bundle's evaluation sample by its runtime
  (``BenchResult.accuracy``); the drop is against the same device's figure for the float32 baseline
  on the same rows, or, when the baseline has no successful result there, against the host's figure for
  the baseline on those rows (``sample_accuracy``). A variant without an on-device figure fails a limit
  on it. Sentences then say "on-device accuracy". The sample is small (its size is in the manifest's
  ``eval_samples``): use it to catch a runtime that computes differently, not for fine ranking.
  Named metrics stay host figures.

Either way, a device whose outputs differ from the host's beyond tolerance reports
``ACCURACY_MISMATCH`` and the variant fails in step 2.

Energy figures in decisions carry the method's honesty: a figure from the utilisation model
(``energy.measured`` false) is printed as ``1.2 mJ (modelled)``, never as a plain measurement.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent import wire
from deploy.errors import PolicyError

Objective = Literal["accuracy", "latency", "energy", "metric"]
AccuracySource = Literal["host", "device"]
Direction = Literal["higher", "lower"]
_MIB = 1024 * 1024
_INF = math.inf

# Which way is better for the built-in metric names, when a manifest has no metrics map (schema 1).
BUILTIN_DIRECTIONS: dict[str, Direction] = {
    "accuracy": "higher",
    "cosine": "higher",
    "sqnr_db": "higher",
    "top1_agreement": "higher",
    "max_abs": "lower",
}
# The policy's tables of named-metric limits, in the order they are checked.
_METRIC_TABLES = ("max_drop", "min_metric", "max_metric")
_FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
_Drop = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """Hard constraints and an objective (see the module docstring)."""

    objective: Objective = "accuracy"
    rank_metric: wire.MetricName | None = Field(
        default=None,
        description="objective 'metric' ranks on it (default: the manifest's primary_metric); "
        "it also breaks latency and energy ties",
    )
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
    max_drop: dict[wire.MetricName, _Drop] = Field(
        default_factory=dict,
        description="per named metric: how much worse than the float32 baseline's host figure (its units)",
    )
    min_metric: dict[wire.MetricName, _FiniteFloat] = Field(
        default_factory=dict, description="per named metric: a floor on the host figure ('higher' metrics)"
    )
    max_metric: dict[wire.MetricName, _FiniteFloat] = Field(
        default_factory=dict, description="per named metric: a ceiling on the host figure ('lower' metrics)"
    )
    max_energy_mj: float | None = Field(default=None, gt=0, description="energy per inference, mJ")
    max_peak_rss_mb: float | None = Field(default=None, gt=0, description="peak RSS of the bench child, MiB")
    reject_throttled: bool = Field(default=False, description="a throttled run does not count")
    reject_contended: bool = Field(
        default=True,
        description="a result the device published as contended (other processes disturbed its timed "
        "window past the agent's threshold, after retries) does not count",
    )

    @model_validator(mode="before")
    @classmethod
    def _min_shorthand(cls, data: Any) -> Any:
        """``min_<metric> = x`` is ``min_metric.<metric> = x``. A key one typo away from a real key
        (``min_acuracy``, ``min_metrics``) is left alone, so that it fails as an unknown key naming the
        real one; any other unknown metric name is refused once the manifest is known."""
        if not isinstance(data, Mapping):
            return data
        names = list(cls.model_fields)
        moved = {
            key: value
            for key, value in data.items()
            if isinstance(key, str)
            and key.startswith("min_")
            and key not in cls.model_fields
            and re.fullmatch(wire.METRIC_PATTERN, key[4:])
            and not difflib.get_close_matches(key, names, n=1, cutoff=0.88)
        }
        table = data.get("min_metric", {})
        if not moved or not isinstance(table, Mapping):
            return data  # (a min_metric that is not a table fails validation, naming it)
        table = dict(table)
        for key, value in moved.items():
            if key[4:] in table:
                raise ValueError(f"{key} and min_metric.{key[4:]} are the same limit: give it once")
            table[key[4:]] = value
        return {**{k: v for k, v in data.items() if k not in moved}, "min_metric": table}

    def metric_limits(self) -> bool:
        """Whether the rule limits any named metric."""
        return bool(self.max_drop or self.min_metric or self.max_metric)


class Policy(_Strict):
    name: str = Field(default="default", min_length=1, max_length=200)
    default: Rule = Field(default_factory=Rule)
    classes: dict[wire.Identifier, Rule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _limits_can_all_matter(self) -> Self:
        """A rule (after a class's overlay) whose p99 limit is below its p95 limit is a mistake: p99 is
        never below p95, so the p95 limit could never decide anything (swapped values, most likely). So
        are a floor above a ceiling on one metric, accuracy in the named-metric tables (it has its own
        keys, which follow accuracy_source), and a rank_metric that the table's objective ignores."""
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
            for key in _METRIC_TABLES:
                if "accuracy" in getattr(rule, key):
                    raise ValueError(
                        f"{where}: {key}.accuracy: accuracy has its own keys, min_accuracy and "
                        "max_accuracy_drop (which follow accuracy_source)"
                    )
            for name, floor in rule.min_metric.items():
                ceiling = rule.max_metric.get(name)
                if ceiling is not None and floor > ceiling:
                    raise ValueError(
                        f"{where}: min_metric.{name} {floor:g} is above max_metric.{name} {ceiling:g}: "
                        "no figure meets both"
                    )
        for where, given, rule in self.tables():
            if "rank_metric" in given.model_fields_set and rule.objective == "accuracy":
                raise ValueError(
                    f"{where}: rank_metric {given.rank_metric!r} is not used by objective 'accuracy': "
                    'set objective = "metric" to rank on it'
                )
        return self

    def rules(self) -> list[tuple[str, Rule]]:
        """Every rule a device can get, named as in the file: the default, then each class overlaid."""
        return [("default", self.default)] + [
            (f"classes.{c}", self.rule_for(c)) for c in sorted(self.classes)
        ]

    def tables(self) -> list[tuple[str, Rule, Rule]]:
        """Every table of the file as written, with the rule it gives (the class's overlaid)."""
        return [("default", self.default, self.default)] + [
            (f"classes.{c}", self.classes[c], self.rule_for(c)) for c in sorted(self.classes)
        ]

    def rule_for(self, device_class: str | None) -> Rule:
        override = self.classes.get(device_class) if device_class else None
        if override is None:
            return self.default
        # Only the keys the class sets replace the default's (pydantic records which were given); the
        # named-metric tables merge per metric.
        update = {k: getattr(override, k) for k in override.model_fields_set}
        for table in _METRIC_TABLES:
            if table in update:
                update[table] = {**getattr(self.default, table), **update[table]}
        return self.default.model_copy(update=update)

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
        elif e["type"] == "value_error":  # a check across one table's keys
            lines.append(f"{source}: {loc}: {e['msg'].removeprefix('Value error, ')}")
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
# Named metrics: what a manifest carries, and whether a policy fits it


def metric_directions(manifest: wire.Manifest) -> dict[str, Direction | None]:
    """Every metric ``manifest`` declares or its variants carry, by name, with which way is better: the
    manifest's ``metrics`` map, else the built-in direction, else None (unknown). A schema-1 manifest
    carries ``accuracy`` and ``top1_agreement`` in its fixed fields."""
    names = set(manifest.metrics)
    for v in manifest.variants:
        names.update(v.metrics.named)
        if v.metrics.accuracy is not None:
            names.add("accuracy")
        if v.metrics.agreement is not None:
            names.add("top1_agreement")
    out: dict[str, Direction | None] = {}
    for name in sorted(names):
        info = manifest.metrics.get(name)
        out[name] = info.direction if info is not None else BUILTIN_DIRECTIONS.get(name)
    return out


def _quality_name(
    rule: Rule, manifest: wire.Manifest, directions: Mapping[str, Direction | None]
) -> tuple[str, bool]:
    """The metric ``rule`` ranks on (objective accuracy or metric) or breaks latency and energy ties on,
    and whether it stands in for an accuracy the manifest lacks: its primary metric, else cosine."""
    if rule.objective == "metric":
        return rule.rank_metric or manifest.primary_metric or "accuracy", False
    stand_in = None
    if "accuracy" not in directions:
        stand_in = manifest.primary_metric or ("cosine" if "cosine" in directions else None)
    if rule.objective == "accuracy":
        return (stand_in, True) if stand_in else ("accuracy", False)
    return rule.rank_metric or stand_in or "accuracy", False


def _fit_problems(policy: Policy, manifest: wire.Manifest, directions: Mapping[str, Direction | None]) -> str:
    """Why ``policy`` cannot be applied to ``manifest`` (one line), or "" when it can: a named metric the
    manifest lacks or gives no direction for, a floor on a "lower" metric or a ceiling on a "higher" one,
    accuracy limits on a generic manifest without accuracy. Each table is checked for the keys it sets."""
    has_accuracy = "accuracy" in directions
    problems: list[str] = []

    def check(where: str, key: str, name: str, want: Direction | None = None) -> None:
        if name not in directions:
            guess = difflib.get_close_matches(name, list(directions), n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            problems.append(f"{where} {key}: no metric {name!r}{hint}")
        elif directions[name] is None:
            problems.append(f"{where} {key}: the manifest says nothing of which way {name!r} is better")
        elif want is not None and directions[name] != want:
            other = "max_metric" if want == "higher" else "min_metric"
            problems.append(
                f"{where} {key}: {name} is {directions[name]}-is-better, so the limit belongs in "
                f"{other}.{name}"
            )

    for where, table, rule in policy.tables():
        for name in table.max_drop:
            check(where, f"max_drop.{name}", name)
        for name in table.min_metric:
            check(where, f"min_metric.{name}", name, "higher")
        for name in table.max_metric:
            check(where, f"max_metric.{name}", name, "lower")
        if table.rank_metric is not None:
            check(where, "rank_metric", table.rank_metric)
        if rule.rank_metric is None and (table is policy.default or "objective" in table.model_fields_set):
            name, _ = _quality_name(rule, manifest, directions)
            if name != "accuracy" or (rule.objective == "metric" and manifest.primary_metric):
                check(where, f"objective {rule.objective!r} (primary_metric)", name)
            elif rule.objective == "metric" and not has_accuracy:
                problems.append(
                    f"{where} objective 'metric': no rank_metric, and the manifest has no primary_metric"
                )
        if not has_accuracy and manifest.task == "generic":  # (no labels: no device measures one either)
            for key in ("max_accuracy_drop", "min_accuracy"):
                if getattr(table, key) is not None:
                    problems.append(f"{where} {key}: the manifest has no accuracy")
    if not problems:
        return ""
    listing = ", ".join(f"{n} ({d or 'direction unknown'})" for n, d in directions.items()) or "none"
    return (
        f"policy {policy.name!r} does not fit {manifest.model} v{manifest.version}: "
        + "; ".join(problems)
        + f" (the manifest's metrics: {listing})"
    )


@dataclass(frozen=True, slots=True)
class _Metric:
    """One named metric over the manifest's variants (host figures), built once per ``select``."""

    name: str
    higher: bool
    unit: str  # how drops print: "pts" (a 0..1 fraction, x100), "dB", or "" (the metric's units)
    values: dict[str, float | None]  # by variant id
    places: dict[str, float]  # rank-key place by variant id (smaller ranks first; unknown last)
    baseline: float | None


def _metric(manifest: wire.Manifest, name: str, direction: Direction) -> _Metric:
    values: dict[str, float | None] = {}
    for v in manifest.variants:
        x = v.metrics.value(name)
        if x is None and name == "top1_agreement" and v.id == manifest.baseline:
            x = 1.0  # the baseline agrees with itself
        values[v.id] = x
    higher = direction == "higher"
    known = [x for x in values.values() if x is not None]
    if name.endswith("_db"):
        unit = "dB"
    elif higher and known and all(0.0 <= x <= 1.0 for x in known):
        unit = "pts"
    else:
        unit = ""
    places = {vid: (round(-x if higher else x, 9) if x is not None else _INF) for vid, x in values.items()}
    return _Metric(name, higher, unit, values, places, values[manifest.baseline])


def _pair(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with enough significant digits to tell them apart (at least ``digits``)."""
    sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
    for d in range(digits + 1, 13):
        if sa != sb:
            break
        sa, sb = f"{a:.{d}g}", f"{b:.{d}g}"
    return sa, sb


def _limit(x: float) -> str:
    """A limit as the operator wrote it (shortest form, no float noise)."""
    return f"{x:.12g}"


def _beyond(x: float, limit: float, above: bool, digits: int) -> str:
    """``x`` (which breaks ``limit``) with at least ``digits`` significant digits, and as many more as it
    takes for the printed figure to stay above (``above``) or below the limit."""
    for d in range(digits, 13):
        s = f"{x:.{d}g}"
        if (float(s) > limit) if above else (float(s) < limit):
            return s
    return f"{x:.12g}"


def _drop_text(name: str, m: _Metric, drop: float, limit: float) -> str:
    """ "miou drop 3.1 pts > max 2 pts", "sqnr_db drop 4.2 dB > max 3 dB", "max_abs rise 0.031 > max 0.02"."""
    what = f"{name} {'drop' if m.higher else 'rise'}"
    if m.unit == "pts":
        return f"{what} {_beyond(drop * 100, limit * 100, True, 2)} pts > max {_limit(limit * 100)} pts"
    unit = " dB" if m.unit == "dB" else ""
    return f"{what} {_beyond(drop, limit, True, 3)}{unit} > max {_limit(limit)}{unit}"


def _metric_violation(vid: str, rule: Rule, metrics: Mapping[str, _Metric]) -> str | None:
    """The named-metric limits of ``rule`` on variant ``vid``'s host figures (None: all hold)."""
    for name, limit in rule.max_drop.items():
        m = metrics[name]
        x = m.values[vid]
        if x is None:
            return f"no host {name}"
        if m.baseline is None:
            return f"no host {name} for the baseline to compare with"
        drop = m.baseline - x if m.higher else x - m.baseline
        if drop > limit + 1e-12:
            return _drop_text(name, m, drop, limit)
    for name, floor in rule.min_metric.items():
        x = metrics[name].values[vid]
        if x is None:
            return f"no host {name}"
        if x < floor - 1e-12:
            return f"{name} {_beyond(x, floor, False, 4)} < min {_limit(floor)}"
    for name, ceiling in rule.max_metric.items():
        x = metrics[name].values[vid]
        if x is None:
            return f"no host {name}"
        if x > ceiling + 1e-12:
            return f"{name} {_beyond(x, ceiling, True, 4)} > max {_limit(ceiling)}"
    return None


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
    # The metric the rule ranks on (objective accuracy or metric) or breaks latency/energy ties on:
    # "accuracy" (then metric_value is ``accuracy``) or a named metric's host figure, e.g. cosine.
    metric: str | None = None
    metric_value: float | None = None


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
    """Among the successful results for file ``sha256``: an uncontended one first, then the lowest (p50,
    p95, threads); first of equals."""
    best: wire.BenchResult | None = None
    best_key: tuple[bool, float, float, int] | None = None
    for r in results:
        lat = r.latency_ms
        if r.ok and lat is not None and r.sha256 == sha256:
            key = (bool(r.contended), lat.p50, lat.p95, r.threads)
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
    b: _Base,
    r: wire.BenchResult,
    accuracy: float | None,
    drop: float | None,
    source: AccuracySource,
    metric: str,
    metric_value: float | None,
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
        metric,
        metric_value,
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
    if rule.reject_contended and r.contended:
        return "contended"
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
# How a rule ranks: "accuracy" (accuracy first, objective accuracy or metric), "metric" (a named metric
# first), "latency", "energy" (the quality metric third).
_Kind = Literal["accuracy", "metric", "latency", "energy"]


def _accuracy_place(accuracy: float | None) -> float:
    """Rank-key place of an accuracy (smaller ranks first), rounded so that float noise in how a ratio
    was computed does not break a tie; unknown accuracy ranks last."""
    return round(-accuracy, 9) if accuracy is not None else _INF


def _rank_key(quality_place: float, b: _Base, c: Candidate, kind: _Kind) -> RankKey:
    """Smaller ranks first: the objective's places (see the module docstring), then the file size.

    Exact ties after that go to the variant id (see :meth:`_Selector.decide`).
    """
    energy = c.energy_mj if c.energy_mj is not None else _INF
    if kind == "accuracy":
        return (quality_place, b.agreement_place, c.p95_ms or 0.0, energy, c.size_bytes)
    if kind == "metric":
        return (quality_place, c.p95_ms or 0.0, energy, c.size_bytes)
    if kind == "latency":
        return (c.p50_ms or 0.0, c.p95_ms or 0.0, quality_place, c.size_bytes)
    return (energy, c.p50_ms or 0.0, quality_place, c.size_bytes)


def _show_quality(c: Candidate) -> str:
    return "n/a" if c.metric_value is None else f"{c.metric_value:.4g}"


def _show_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{_fmt(x)} ms"


def _show_agree(c: Candidate) -> str:
    return "n/a" if c.agreement is None else f"{c.agreement:.4g}"


_CRITERIA: dict[str, tuple[str, Callable[[Candidate], str], str]] = {
    "agreement": ("lower agreement with float32", _show_agree, "<"),
    "p50": ("higher p50", lambda c: _show_ms(c.p50_ms), ">"),
    "p95": ("higher p95", lambda c: _show_ms(c.p95_ms), ">"),
    "energy": ("higher energy", lambda c: _mj(c.energy_mj, c.energy_measured), ">"),
}
_QUALITY = "*"  # the rule's quality metric in an order below
_ORDER: dict[_Kind, list[str]] = {
    "accuracy": [_QUALITY, "agreement", "p95", "energy"],
    "metric": [_QUALITY, "p95", "energy"],
    "latency": ["p50", "p95", _QUALITY],
    "energy": ["energy", "p50", _QUALITY],
}
_Reason = tuple[str, Callable[[Candidate], str], str, str]
_REASONS: dict[tuple[_Kind, str, bool], list[_Reason]] = {}


def _reasons(kind: _Kind, label: str, higher: bool) -> list[_Reason]:
    """Per criterion of ``kind``'s order, the quality metric called ``label``: (what the loser had, how
    to show a figure, comparison sign, prefix). Cached: a fleet shares a few."""
    key = (kind, label, higher)
    reasons = _REASONS.get(key)
    if reasons is None:
        order = _ORDER[kind]
        names = [label if n == _QUALITY else n for n in order]
        reasons = []
        show: Callable[[Candidate], str]
        for i, name in enumerate(order):
            if name == _QUALITY:
                what = f"{'lower' if higher else 'higher'} {label}"
                show, sign = _show_quality, "<" if higher else ">"
            else:
                what, show, sign = _CRITERIA[name]
            reasons.append((what, show, sign, "" if i == 0 else "tie on " + ", ".join(names[:i]) + "; "))
        _REASONS[key] = reasons
    return reasons


def _lost_to(loser: Candidate, winner: Candidate, reasons: list[_Reason], lk: RankKey, wk: RankKey) -> str:
    """Why ``loser`` ranked below ``winner`` (the first differing criterion of ``reasons``).

    ``lk``, ``wk``: their :func:`_rank_key` under the same rule.
    """
    for i, (label, show, sep, prefix) in enumerate(reasons):
        if lk[i] != wk[i]:
            lv, wv = loser.metric_value, winner.metric_value
            if show is _show_quality and lv is not None and wv is not None:
                shown = _pair(lv, wv)  # close figures (a cosine of 0.99991 and 0.99994) stay apart
                return f"{prefix}{label} {shown[0]} {sep} {shown[1]} ({winner.variant})"
            return f"{prefix}{label} {show(loser)} {sep} {show(winner)} ({winner.variant})"
    if lk[len(reasons)] != wk[len(reasons)]:
        return f"tie; larger file {loser.size_bytes} B > {winner.size_bytes} B ({winner.variant})"
    return f"tie with {winner.variant}; chosen by id order"


@dataclass(frozen=True, slots=True)
class _Quality:
    """The metric a rule ranks on or breaks latency/energy ties on."""

    name: str  # "accuracy" or a named metric
    label: str  # as sentences say it: "accuracy", "on-device accuracy", "cosine"
    higher: bool
    metric: _Metric | None  # None: accuracy, from the rule's accuracy_source
    stand_in: str  # "" or, for objective accuracy on a manifest without accuracy, what the why says


_BEST_OF = {"latency": "lowest latency", "energy": "lowest energy"}


def _why_chosen(w: Candidate, objective: Objective, q: _Quality, n_ok: int, policy: str, where: str) -> str:
    best = _BEST_OF.get(objective) or f"{'highest' if q.higher else 'lowest'} {q.label}"
    figures = []
    if w.metric_value is not None:
        figures.append(f"{q.label} {w.metric_value:.4g}")
    if q.metric is not None and w.accuracy is not None:
        figures.append(f"{'on-device ' if w.accuracy_source == 'device' else ''}accuracy {w.accuracy:.4g}")
    if w.p50_ms is not None and w.p95_ms is not None:
        figures.append(f"p50 {_fmt(w.p50_ms)} ms, p95 {_fmt(w.p95_ms)} ms")
    if w.energy_mj is not None:
        figures.append(_mj(w.energy_mj, w.energy_measured, per="inference"))
    if w.threads is not None:
        figures.append(f"{w.threads} thread(s)")
    why = f"{best} of {n_ok} variant(s) meeting policy {policy!r} ({where}): " + "; ".join(figures)
    if q.stand_in:
        why += f" (this manifest has no accuracy: objective 'accuracy' ranked on {q.stand_in})"
    return why


def unreachable_rules(policy: Policy, manifest: wire.Manifest) -> list[str]:
    """The rules of ``policy`` no variant of ``manifest`` can meet, whatever devices report: one line each.

    Only host figures are known before devices report, so this catches accuracy limits (with
    ``accuracy_source = "host"``) and named-metric limits that every variant fails, such as a
    ``min_accuracy`` above the best variant's accuracy: such a rule would keep every device of its class
    on its current model. A policy that does not fit the manifest at all (a metric it lacks, see
    :func:`select`) gives that one line instead.
    """
    try:
        selector = _Selector(manifest, policy)
    except PolicyError as err:
        return [str(err)]
    problems = []
    for where, rule in policy.rules():
        judged = selector.judge(rule)
        accuracy = rule.accuracy_source == "host" and (
            rule.max_accuracy_drop is not None or rule.min_accuracy is not None
        )
        named = rule.metric_limits()
        if not accuracy and not named:
            continue
        verdicts = {
            b.id: (judged.host_accuracy[b.id] if accuracy else None) or judged.host_metric[b.id]
            for b in selector.bases
        }
        if all(v is not None for v in verdicts.values()):
            what = "accuracy and metric" if accuracy and named else "accuracy" if accuracy else "metric"
            why = "; ".join(f"{vid}: {v}" for vid, v in verdicts.items())
            problems.append(
                f"policy {policy.name!r} {where}: no variant of {manifest.model} v{manifest.version} "
                f"meets its {what} limits ({why})"
            )
    return problems


def decide(
    manifest: wire.Manifest, report: wire.Report, status: wire.Status | None, policy: Policy
) -> Decision:
    """The decision for one device (its report must be for this manifest's model and version)."""
    return _Selector(manifest, policy).decide(report, status)


@dataclass(frozen=True, slots=True)
class _Rule:
    """A policy rule with its verdicts on each variant's host figures (by id; None: the variant passes)
    and how it ranks."""

    rule: Rule
    host_accuracy: dict[str, str | None]  # the accuracy limits on host accuracy
    host_metric: dict[str, str | None]  # the named-metric limits
    host_quality: dict[str, str | None]  # both, accuracy first (what a host-accuracy rule checks)
    quality: _Quality
    kind: _Kind
    reasons: list[_Reason]


class _Selector:
    """One manifest and policy; caches what every device's decision shares (bases, rules, runtime checks).

    Per device, most variants pass or fail on a few comparisons: sentences (why a variant failed or lost)
    and :class:`Candidate` objects are made only where a decision shows them.

    Raises PolicyError when the policy does not fit the manifest (see :func:`_fit_problems`).
    """

    def __init__(self, manifest: wire.Manifest, policy: Policy) -> None:
        self.manifest = manifest
        self.policy = policy
        self.directions = metric_directions(manifest)
        problem = _fit_problems(policy, manifest, self.directions)
        if problem:
            raise PolicyError(problem)
        self.bases = _prepare(manifest)
        self.baseline = next(b for b in self.bases if b.id == manifest.baseline)
        self.metrics: dict[str, _Metric] = {}
        self.rules: dict[str | None, _Rule] = {}
        self.supports: Supports = {}

    def metric(self, name: str) -> _Metric:
        m = self.metrics.get(name)
        if m is None:
            direction = self.directions.get(name)
            assert direction is not None  # _fit_problems refused the policy otherwise
            m = self.metrics[name] = _metric(self.manifest, name, direction)
        return m

    def judge(self, rule: Rule) -> _Rule:
        """``rule``'s verdicts on the host figures of every variant, and how it ranks."""
        metrics = {name: self.metric(name) for table in _METRIC_TABLES for name in getattr(rule, table)}
        host_accuracy = {
            b.id: _accuracy_violation(b.accuracy, b.accuracy_drop, rule, "host") for b in self.bases
        }
        host_metric = {b.id: _metric_violation(b.id, rule, metrics) if metrics else None for b in self.bases}
        host_quality = {vid: host_accuracy[vid] or host_metric[vid] for vid in host_accuracy}
        name, stand_in = _quality_name(rule, self.manifest, self.directions)
        if name == "accuracy":
            label = "on-device accuracy" if rule.accuracy_source == "device" else "accuracy"
            quality = _Quality(name, label, True, None, "")
        else:
            m = self.metric(name)
            primary = name == self.manifest.primary_metric
            note = (f"its primary metric, {name}" if primary else name) if stand_in else ""
            quality = _Quality(name, name, m.higher, m, note)
        kind: _Kind
        if rule.objective in ("accuracy", "metric"):
            kind = "accuracy" if quality.metric is None else "metric"
        else:
            kind = rule.objective
        reasons = _reasons(kind, quality.label, quality.higher)
        return _Rule(rule, host_accuracy, host_metric, host_quality, quality, kind, reasons)

    def rule_for(self, device_class: str | None) -> _Rule:
        rule = self.rules.get(device_class)
        if rule is None:
            rule = self.rules[device_class] = self.judge(self.policy.rule_for(device_class))
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
        quality = checks.quality
        named = quality.metric  # None: the quality metric is accuracy
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
                quality_failure = checks.host_quality[vid]
            else:
                accuracy, place = best.accuracy, _accuracy_place(best.accuracy)
                drop = (
                    baseline_accuracy - accuracy
                    if baseline_accuracy is not None and accuracy is not None
                    else None
                )
                quality_failure = _accuracy_violation(accuracy, drop, rule, source) or checks.host_metric[vid]
            failure = _run_violation(best, lat, rule) or quality_failure or _resource_violation(best, rule)
            if failure is not None:
                lost[vid] = failure
                continue
            if named is None:
                value = accuracy
            else:
                value, place = named.values[vid], named.places[vid]
            cand = _candidate(b, best, accuracy, drop, source, quality.name, value)
            eligible.append((_rank_key(place, b, cand, checks.kind), vid, cand, b))

        where = f"class {device_class}" if device_class in policy.classes else "default rule"
        chosen: Candidate | None = None
        sha256: str | None = None
        if not eligible:
            keep = f"keeping the current variant {current}" if current else "keeping the current model"
            why = f"no variant meets policy {policy.name!r} ({where}): {keep}"
            if "contended" in lost.values():
                why += "; contended results are not ranked: rebenchmark when the device is quieter"
        else:
            eligible.sort(key=lambda e: e[:2])  # the variant id settles exact ties
            wk, _, chosen, wb = eligible[0]
            sha256 = wb.sha256
            for lk, vid, cand, _b in eligible[1:]:
                lost[vid] = _lost_to(cand, chosen, checks.reasons, lk, wk)
            why = _why_chosen(chosen, objective, quality, len(eligible), policy.name, where)
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
    """One decision per device whose report is for ``manifest.model`` at ``manifest.version``, by device.

    Raises PolicyError, in one line listing the manifest's metrics, when the policy names a metric the
    manifest lacks (or misuses one, see the module docstring).
    """
    selector = _Selector(manifest, policy)
    out = []
    for device in sorted(reports):
        report = reports[device]
        if report.model != manifest.model or report.manifest_version != manifest.version:
            continue
        out.append(selector.decide(report, statuses.get(device)))
    return out
