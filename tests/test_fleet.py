"""The fleet views: rows with energy honesty, per-device reports, the plot, and the collector-DB path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy import make_manifest, make_report, make_status, make_variant, ok_result

from agent import wire
from deploy import cli
from deploy.control.select import Policy, decide
from deploy.observe.fleet import fleet_rows, fleet_table, report_rows, report_table
from deploy.observe.plot import plot_model, plot_points
from deploy.observe.state import FleetState
from deploy.observe.store import FleetStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def m() -> wire.Manifest:
    return make_manifest(
        [
            make_variant("fp32", b"a" * 300, 0.97),
            make_variant("fp16", b"b" * 200, 0.96),
            make_variant("int8", b"c" * 100, 0.95),
        ]
    )


def measured(r: wire.BenchResult, mj: float) -> wire.BenchResult:
    energy = wire.Energy(method="hwmon", measured=True, sensor="ina219", mj_per_inference=mj, avg_power_w=4.0)
    return r.model_copy(update={"energy": energy})


def state_for(m: wire.Manifest) -> FleetState:
    fp32, fp16, int8 = (m.variant(v) for v in ("fp32", "fp16", "int8"))
    failed = wire.BenchResult(
        variant="int8", sha256=int8.sha256, ok=False, error="UNSUPPORTED_OP", error_detail="op 42", ts=1.0
    )
    return FleetState(
        manifests={"digits": m},
        statuses={
            "pi-a": make_status("pi-a", "fast", fp32, m),
            "pi-b": make_status("pi-b", None, fp16, m),
        },
        reports={
            ("pi-a", "digits"): make_report(
                "pi-a",
                m,
                [ok_result(fp32, 10.0, energy=2.0), ok_result(fp16, 6.0, energy=1.5), failed],
                ts=100,
            ),
            ("pi-b", "digits"): make_report(
                "pi-b",
                m,
                [measured(ok_result(fp32, 20.0), 4.0), measured(ok_result(fp16, 12.0), 3.0)],
                ts=100,
            ),
        },
    )


def test_fleet_rows_mark_modelled_energy(m: wire.Manifest) -> None:
    rows = {r.device: r for r in fleet_rows(state_for(m), now=130.0)}
    assert rows["pi-a"].energy_mj == 2.0 and rows["pi-a"].energy_measured is False
    assert rows["pi-a"].energy_method == "model"
    assert rows["pi-b"].energy_mj == 3.0 and rows["pi-b"].energy_measured is True
    text = fleet_table(list(rows.values()))
    assert "2 mJ (modelled)" in text
    line_b = next(line for line in text.splitlines() if line.startswith("pi-b"))
    assert "3 mJ" in line_b and "modelled" not in line_b
    assert "30s" in text  # report age


def test_report_rows_show_every_result(m: wire.Manifest) -> None:
    rows = report_rows(state_for(m), "pi-a", now=130.0)
    assert [(r.variant, r.ok, r.active) for r in rows] == [
        ("fp32", True, True),
        ("fp16", True, False),
        ("int8", False, False),
    ]
    assert rows[0].host_accuracy == 0.97 and rows[0].p95_ms == 12.0 and rows[0].energy_method == "model"
    assert rows[2].error == "UNSUPPORTED_OP" and rows[2].p50_ms is None
    text = report_table(rows)
    assert "fp32 *" in text and "UNSUPPORTED_OP" in text and "(modelled)" in text
    assert report_rows(state_for(m), "pi-a", model="other") == []


def test_decision_says_modelled_unless_measured(m: wire.Manifest) -> None:
    state = state_for(m)
    policy = Policy(name="lab")
    a = decide(m, state.reports[("pi-a", "digits")], state.statuses["pi-a"], policy)
    assert a.chosen is not None and a.chosen.energy_measured is False
    assert "2 mJ/inference (modelled)" in a.why
    b = decide(m, state.reports[("pi-b", "digits")], state.statuses["pi-b"], policy)
    assert b.chosen is not None and b.chosen.energy_measured is True
    assert "4 mJ/inference" in b.why and "modelled" not in b.why
    limited = Policy.from_mapping({"default": {"max_energy_mj": 1.0}})
    d = decide(m, state.reports[("pi-a", "digits")], state.statuses["pi-a"], limited)
    assert d.lost["fp32"] == "energy 2 mJ (modelled) > max 1 mJ"


def test_plot_writes_a_png(m: wire.Manifest, tmp_path: Path) -> None:
    state = state_for(m)
    pts = plot_points(state, "digits")
    assert [p[0] for p in pts["pi-a"]] == ["fp32", "fp16"]  # int8 failed: no point
    assert [p[3] for p in pts["pi-b"]] == [False, True]  # fp16 is active on pi-b
    out = plot_model(state, "digits", tmp_path / "plots" / "digits.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_deploy_imports_no_matplotlib() -> None:
    code = (
        "import sys, deploy.cli, deploy.observe.views, deploy.observe.plot, deploy.control.rollout\n"
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fleet_and_report_from_the_collector_db(
    m: wire.Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_for(m)
    db = tmp_path / "fleet.db"
    with FleetStore(db) as store:
        for st in state.statuses.values():
            store.ingest_status(st)
        for rep in state.reports.values():
            store.ingest_report(rep)
        store.commit()
    assert cli.main(["fleet", "--db", str(db), "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["pi-a"]["active"] == "fp32" and rows["pi-a"]["energy_measured"] is False
    assert rows["pi-b"]["p50_ms"] == 12.0
    assert cli.main(["fleet", "--db", str(db)]) == 0
    assert "(modelled)" in capsys.readouterr().out
    assert cli.main(["report", "pi-b", "--db", str(db), "--model", "digits"]) == 0
    text = capsys.readouterr().out
    assert "hwmon" in text and "fp16 *" in text
    assert cli.main(["report", "pi-b", "--db", str(db), "--json"]) == 0
    assert {r["variant"] for r in json.loads(capsys.readouterr().out)} == {"fp32", "fp16"}
    assert cli.main(["report", "pi-z", "--db", str(db)]) == 2
    assert "no report from pi-z" in capsys.readouterr().err
    assert cli.main(["fleet", "--db", str(tmp_path / "missing.db")]) == 2
