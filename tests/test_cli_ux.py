"""The command lines refuse what they do not know and say what was meant.

Every parser (edgefleet, its subcommands, edgefleet-agent, the stand-alone compressor, the benches and
scripts) takes exact flags only and answers a typo with one line from the parser it was given to; the
compressor names the model after its file; an unknown model on the broker is answered with the
models it has; the demo cleans up after itself; TensorFlow's own log lines stay off the terminal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import fleet_source
from test_deploy import write_bundle

from agent import cli as agent_cli
from agent.argparsing import StrictParser
from agent.wire import IdentifierError
from compressor import cli as compressor_cli
from compressor.errors import DataError
from deploy import cli
from deploy import demo as demo_module
from deploy.broker.client import BrokerOptions
from deploy.broker.spawn import MosquittoBroker, find_mosquitto
from deploy.keys import init_keys

ROOT = Path(__file__).resolve().parent.parent
EDGEFLEET_USAGE = 1  # edgefleet's documented exit code for a usage error (2 is an expected failure)
ARGPARSE_USAGE = 2  # edgefleet-agent and the stand-alone compressor keep argparse's


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ typos: edgefleet


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["publish", "--hots", "x", "b"], "edgefleet publish: unknown flag --hots; did you mean --host?"),
        (
            ["compress", "--modle", "x.keras"],
            "edgefleet compress: unknown flag --modle; did you mean --model?",
        ),
        (
            ["compress", "--demo", "--epoch", "3", "--out", "b"],
            "edgefleet compress: unknown flag --epoch; did you mean --epochs?",
        ),
        (["select", "--modle", "x"], "edgefleet select: unknown flag --modle; did you mean --model?"),
        (
            ["assign", "--model", "x", "--dryrun"],
            "edgefleet assign: unknown flag --dryrun; did you mean --dry-run?",
        ),
        (["keys", "init", "--dri", "k"], "edgefleet keys init: unknown flag --dri; did you mean --dir?"),
        (
            ["rollout", "digits", "--canery", "1"],
            "edgefleet rollout: unknown flag --canery; did you mean --canary?",
        ),
        (["demo", "--kep"], "edgefleet demo: unknown flag --kep; did you mean --keep?"),
        (
            ["publish", "--host=h", "--prot=1", "b"],
            "edgefleet publish: unknown flag --prot; did you mean --port?",
        ),
        (["pubish", "b"], "edgefleet: unknown command 'pubish'; did you mean 'publish'?"),
        (["keys", "int"], "edgefleet keys: unknown command 'int'; did you mean 'init'?"),
        (["--hots", "x", "publish"], "edgefleet: unknown flag --hots (see edgefleet --help)"),
    ],
)
def test_edgefleet_typo_is_one_line_from_its_subcommand(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == EDGEFLEET_USAGE
    captured = capsys.readouterr()
    assert one_line(captured.err) == line
    assert captured.out == ""


def test_epoch_is_not_taken_for_epochs() -> None:
    parser = StrictParser(prog="p")
    parser.add_argument("--epochs", type=int)
    assert parser.parse_args(["--epochs", "3"]).epochs == 3
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--epoch", "3"])
    assert exit_.value.code == ARGPARSE_USAGE


def test_rollout_action_typo_is_suggested(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rollout", "statsu", "digits"]) == EDGEFLEET_USAGE
    assert one_line(capsys.readouterr().err).endswith("did you mean `status digits`?")


def test_a_missing_required_argument_stays_argparse_s_from_the_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["select", "--json"]) == EDGEFLEET_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: edgefleet select ")
    assert err.rstrip().endswith("edgefleet select: error: the following arguments are required: --model")


def test_the_console_script_exits_with_the_usage_code() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deploy", "publish", "--hots", "x", "b"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == EDGEFLEET_USAGE
    assert out.stderr == "edgefleet publish: unknown flag --hots; did you mean --host?\n"


# ------------------------------------------------------------------------------ typos: the others


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--check-confg"], "edgefleet-agent: unknown flag --check-confg; did you mean --check-config?"),
        (["--confg", "agent.toml"], "edgefleet-agent: unknown flag --confg; did you mean --config?"),
        (
            ["calibrate", "--second", "3"],
            "edgefleet-agent calibrate: unknown flag --second; did you mean --seconds?",
        ),
        (["calibrat"], "edgefleet-agent: unknown command 'calibrat'; did you mean 'calibrate'?"),
    ],
)
def test_agent_typo(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        agent_cli.main(argv)
    assert exit_.value.code == ARGPARSE_USAGE
    assert one_line(capsys.readouterr().err) == line


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["compress", "--demo", "--epoch", "3", "--out", "b"],
            "edgefleet compress: unknown flag --epoch; did you mean --epochs?",
        ),
        (
            ["compress", "--modle", "m.keras"],
            "edgefleet compress: unknown flag --modle; did you mean --model?",
        ),
        (["compres", "--demo"], "edgefleet: unknown command 'compres'; did you mean 'compress'?"),
    ],
)
def test_standalone_compressor_typo(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        compressor_cli.main(argv)
    assert exit_.value.code == ARGPARSE_USAGE
    assert one_line(capsys.readouterr().err) == line


@pytest.mark.parametrize(
    ("script", "argv", "line"),
    [
        (["-m", "deploy.broker.embedded"], ["--prot", "1"], "unknown flag --prot; did you mean --port?"),
        (["benches/publish.py"], ["--windw", "3"], "unknown flag --windw; did you mean --window?"),
        (
            ["scripts/arm64_smoke_check.py"],
            ["--bundel", "b"],
            "unknown flag --bundel; did you mean --bundle?",
        ),
    ],
)
def test_benches_and_scripts_typo(script: list[str], argv: list[str], line: str) -> None:
    out = subprocess.run(
        [sys.executable, *script, *argv],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == ARGPARSE_USAGE, out.stderr
    assert one_line(out.stderr).endswith(line)


def test_every_parser_is_strict() -> None:
    """A new argparse.ArgumentParser would bring back prefix matching and the top-level usage on a typo."""
    plain = []
    for folder in ("agent", "deploy", "compressor", "scripts", "benches"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if re.search(r"\bArgumentParser\(", text) and path.name != "argparsing.py":
                plain.append(str(path.relative_to(ROOT)))
    assert plain == []


# ------------------------------------------------------------------------------ model id


def test_model_id_resolution() -> None:
    resolve = compressor_cli.resolve_model_id
    assert resolve(Path("models/my_model.keras"), None) == "my_model"
    assert resolve(Path("face-det.tflite"), None) == "face-det"
    assert resolve(Path("my_model.keras"), "other") == "other"
    assert resolve(None, None) == "digits"  # --demo
    for bad in ("My Model.keras", "my.model.keras", "Model.keras"):
        with pytest.raises(DataError, match="pass --model-id"):
            resolve(Path(bad), None)
    with pytest.raises(IdentifierError):
        resolve(Path("my_model.keras"), "Bad")


def test_invalid_stem_is_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "My Model.keras"
    model.write_bytes(b"x")
    out = tmp_path / "b"
    assert compressor_cli.main(["compress", "--model", str(model), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "'My Model' is not a valid model id" in line and "--model-id" in line
    assert not out.exists()


# ------------------------------------------------------------------------------ unknown models


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path]]:
    """A private broker holding the manifests of two models: digits and face-det."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    work = tmp_path_factory.mktemp("fleet")
    key = init_keys(work / "keys").private_path
    with MosquittoBroker() as broker:
        args = ["--host", broker.host, "--port", str(broker.port), "--namespace", "ux"]
        for model in ("digits", "face-det"):
            write_bundle(work / model, {"float32": 3000, "int8": 1000}, model=model)
            assert cli.main(["publish", str(work / model), "--key", str(key), *args]) == 0
        yield broker, key


@pytest.mark.integration
@pytest.mark.parametrize("source", ["store", "broker"])
@pytest.mark.parametrize("command", ["select", "assign", "rollout"])
def test_unknown_model_lists_the_published_ones(
    command: str,
    source: str,
    fleet_broker: tuple[MosquittoBroker, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, key = fleet_broker
    options = BrokerOptions(host=broker.host, port=broker.port, namespace="ux")
    with fleet_source(source, options, tmp_path / "fleet.db") as (store, synced):
        synced(manifests=2)
        capsys.readouterr()
        where = ["--host", broker.host, "--port", str(broker.port), "--namespace", "ux", *store]
        argv = {
            "select": ["select", "--model", "nope", *where],
            "assign": ["assign", "--model", "nope", "--key", str(key), *where],
            "rollout": ["rollout", "nope", "--key", str(key), "--state-db", str(tmp_path / "r.db"), *where],
        }[command]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # before the collector stops (and logs)
    published = "; models published: digits, face-det"
    assert re.fullmatch(r"edgefleet: no manifest for model 'nope' .*" + published, err), err


@pytest.mark.integration
@pytest.mark.parametrize("source", ["store", "broker"])
def test_unknown_model_on_an_empty_broker(
    source: str,
    fleet_broker: tuple[MosquittoBroker, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, _ = fleet_broker
    options = BrokerOptions(host=broker.host, port=broker.port, namespace="empty")
    with fleet_source(source, options, tmp_path / "fleet.db") as (store, _):
        capsys.readouterr()
        argv = ["select", "--model", "digits", "--host", broker.host, "--port", str(broker.port), *store]
        assert cli.main([*argv, "--namespace", "empty"]) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # before the collector stops (and logs)
    assert "no model is published yet" in err


def test_no_store_and_no_from_broker_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Reading the broker is never implicit: without a collector store the deciding commands stop and
    say what to run (no broker is contacted: none listens on port 1)."""
    dry = ["assign", "--model", "d", "--dry-run"]
    deciding = (["select", "--model", "d"], ["fleet"], ["report", "p"], dry)
    for argv in deciding:
        assert cli.main([*argv, "--port", "1"]) == 2, argv
        err = capsys.readouterr().err.splitlines()[-1]
        assert "no collector store at" in err and "edgefleet collect" in err and "--from-broker" in err


# ------------------------------------------------------------------------------ demo work directory


def _fake_run_demo(seen: list[Path]) -> Any:
    def run(settings: demo_module.DemoSettings, progress: Any) -> demo_module.DemoResult:
        assert settings.workdir is not None
        seen.append(settings.workdir)
        (settings.workdir / "bundle").mkdir(parents=True)
        (settings.workdir / "bundle" / "float32.tflite").write_bytes(b"x" * 1000)
        return demo_module.DemoResult(
            workdir=settings.workdir,
            bundle=settings.workdir / "bundle",
            model="digits",
            manifest_version=1,
            broker="mosquitto (stopped)",
            devices=[],
            seconds=1.0,
        )

    return run


def test_demo_removes_its_temporary_workdir(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(demo_module, "run_demo", _fake_run_demo(seen))
    assert cli.main(["demo"]) == 0
    assert seen and not seen[0].exists()
    assert "removed" in capsys.readouterr().out
    assert cli.main(["demo", "--json"]) == 0
    assert not seen[1].exists()
    assert json.loads(capsys.readouterr().out)["workdir_kept"] is False


def test_demo_keep_keeps_and_says_where(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(demo_module, "run_demo", _fake_run_demo(seen))
    assert cli.main(["demo", "--keep"]) == 0
    try:
        assert (seen[0] / "bundle" / "float32.tflite").is_file()
        assert str(seen[0]) in capsys.readouterr().out
    finally:
        demo_module.remove_workdir(seen[0], keep=False)
    # a --workdir the user chose is never removed
    assert cli.main(["demo", "--workdir", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "bundle").is_dir()


def test_demo_interrupted_still_removes_its_workdir(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []
    fake = _fake_run_demo(seen)

    def interrupted(settings: demo_module.DemoSettings, progress: Any) -> demo_module.DemoResult:
        fake(settings, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_demo", interrupted)
    assert cli.main(["demo"]) == 130
    assert not seen[0].exists()
    capsys.readouterr()


def test_remove_workdir(tmp_path: Path) -> None:
    (tmp_path / "w" / "a").mkdir(parents=True)
    assert demo_module.remove_workdir(tmp_path / "w", keep=True) is False
    assert (tmp_path / "w" / "a").is_dir()
    assert demo_module.remove_workdir(tmp_path / "w", keep=False) is True
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------ TensorFlow noise (slow)

TINY_MODEL = """
import sys
from pathlib import Path

import keras
import numpy as np

out = Path(sys.argv[1])
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(4, activation="softmax")])
model.save(out / "tiny_net.keras")
rng = np.random.default_rng(0)
x = rng.normal(size=(300, 8)).astype("float32")
y = rng.integers(0, 4, 300)
np.savez(out / "d.npz", x_train=x[:200], y_train=y[:200], x_val=x[200:250], y_val=y[200:250],
         x_test=x[250:], y_test=y[250:])
"""

TF_NOISE = re.compile(
    r"^(?:[EWIF]0000|WARNING: All log messages)|oneDNN|Saved artifact|XNNPACK|fully_quantize"
)


def _compress(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI's own setting
    return subprocess.run(
        [sys.executable, "-m", "deploy", "compress", *argv],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if TF_NOISE.search(line)]


@pytest.mark.slow
def test_compress_names_the_model_after_its_file_and_keeps_tensorflow_quiet(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", TINY_MODEL, str(tmp_path)], check=True, capture_output=True, timeout=300
    )
    argv = ["--model", "tiny_net.keras", "--data", "d.npz", "--recipe", "demo", "--variants", "dynint8"]
    out = _compress([*argv, "--out", "b"], tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"] == "tiny_net"
    assert _noise(out.stderr) == [] and _noise(out.stdout) == []
    assert "convert dynint8" in out.stderr  # the compressor's own progress still shows
    assert not (tmp_path / "b" / compressor_cli.TF_LOG).exists()


@pytest.mark.slow
def test_verbose_keeps_tensorflow_s_lines_in_the_bundle(tmp_path: Path) -> None:
    argv = ["--demo", "--recipe", "demo", "--epochs", "1", "--variants", "float32", "--verbose"]
    out = _compress([*argv, "--out", "b"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["model"] == "digits"
    log = tmp_path / "b" / compressor_cli.TF_LOG
    assert f"TensorFlow's log: {log}" in out.stderr
    assert _noise(out.stderr) == [] and _noise(out.stdout) == []
    assert _noise(log.read_text()), "the log holds what the terminal did not show"
