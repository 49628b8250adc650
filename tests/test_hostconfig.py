"""deploy.hostconfig: the host's broker connection from a TOML file, its lookup order, flags over the
file, one-line errors, the first progress line of host commands, and a real host command that finds
its broker through the controller's host.toml written by broker-config (no --host)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import generated_tls_broker

from agent import wire
from deploy import cli, hostconfig
from deploy.broker.client import BrokerOptions, MqttSession
from deploy.broker.conf import CONTROLLER_USER
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port
from deploy.hostconfig import HostConfigError, find_config, load_host_config, resolve_broker
from deploy.observe import collect


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No config of this machine leaks in: a fresh HOME, no env var, no system file."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(hostconfig.ENV_VAR, raising=False)
    monkeypatch.setattr(hostconfig, "SYSTEM_CONFIG", tmp_path / "etc" / "host.toml")
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def flags(*argv: str) -> argparse.Namespace:
    return cli._broker_parent().parse_args(list(argv))


def host_of(path: Path) -> str:
    return load_host_config(path).broker.host


# ------------------------------------------------------------------------------------------- lookup


def test_lookup_order(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_config() is None  # nothing anywhere: built-in defaults
    system = write(hostconfig.SYSTEM_CONFIG, '[broker]\nhost = "system"\n')
    assert find_config() == system
    user = write(isolated / ".config" / "edgefleet" / "host.toml", '[broker]\nhost = "user"\n')
    assert find_config() == user
    env = write(tmp_path / "env.toml", '[broker]\nhost = "env"\n')
    monkeypatch.setenv(hostconfig.ENV_VAR, str(env))
    assert find_config() == env
    explicit = write(tmp_path / "explicit.toml", '[broker]\nhost = "explicit"\n')
    assert find_config(explicit) == explicit
    assert resolve_broker(flags("--config", str(explicit))).options.host == "explicit"
    assert resolve_broker(flags()).options.host == "env"


def test_defaults_without_any_file() -> None:
    resolved = resolve_broker(flags())
    o = resolved.options
    assert (o.host, o.port, o.username, o.password, o.protocol, o.namespace, o.connect_timeout_s) == (
        "127.0.0.1",
        1883,
        None,
        None,
        "v5",
        wire.DEFAULT_NAMESPACE,
        10.0,
    )
    assert resolved.describe() == "broker mqtt://127.0.0.1:1883 as anonymous (from built-in defaults)"
    timeout_only = resolve_broker(flags("--timeout", "2")).describe()
    assert timeout_only.endswith("(from built-in defaults + command line)")
    given = resolve_broker(flags("--host", "broker.lan", "--port", "1884")).describe()
    assert given == "broker mqtt://broker.lan:1884 as anonymous (from command line)"


def test_flags_override_the_file_key_by_key(tmp_path: Path) -> None:
    write(tmp_path / "cfg" / "pw", "s3cret\n")
    write(tmp_path / "cfg" / "ca.crt", "not parsed here\n")
    cfg = write(
        tmp_path / "cfg" / "host.toml",
        '[broker]\nhost = "broker.lan"\nusername = "edgefleet-controller"\npassword_file = "pw"\n'
        'namespace = "fleet"\ntimeout_s = 3\n[broker.tls]\nca_file = "ca.crt"\n',
    )
    base = resolve_broker(flags("--config", str(cfg)))
    o = base.options
    # relative paths are relative to the file; TLS makes the default port 8883
    assert (o.host, o.port, o.username, o.password) == ("broker.lan", 8883, "edgefleet-controller", "s3cret")
    assert o.tls_ca == tmp_path / "cfg" / "ca.crt"
    assert (o.namespace, o.connect_timeout_s) == ("fleet", 3.0)
    assert base.describe() == f"broker mqtts://broker.lan:8883 as edgefleet-controller (from {cfg})"

    other_pw = write(tmp_path / "other-pw", "other\n")
    over = resolve_broker(
        flags(
            "--config",
            str(cfg),
            "--host",
            "10.0.0.5",
            "--port",
            "18883",
            "--username",
            "ops",
            "--password-file",
            str(other_pw),
            "--namespace",
            "lab",
            "--mqtt",
            "v311",
        )
    )
    o = over.options
    assert (o.host, o.port, o.username, o.password, o.namespace, o.protocol) == (
        "10.0.0.5",
        18883,
        "ops",
        "other",
        "lab",
        "v311",
    )
    assert o.tls_ca == tmp_path / "cfg" / "ca.crt"  # not given on the command line: kept from the file
    assert over.describe().endswith(f"(from {cfg} + command line)")
    # the renamed timeout flag of `rollout` lands on the same key
    rollout_flags = cli._broker_parent("--connect-timeout").parse_args(
        ["--config", str(cfg), "--connect-timeout", "7"]
    )
    assert resolve_broker(rollout_flags).options.connect_timeout_s == 7.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[broker]\nhots = "x"\n', "unknown key broker.hots (did you mean 'host'?)"),
        ('[broker.tls]\nca_fle = "x"\n', "unknown key broker.tls.ca_fle (did you mean 'ca_file'?)"),
        ('[brokr]\nhost = "x"\n', "unknown key brokr (did you mean 'broker'?)"),
        ('[broker]\nport = "eighty"\n', "broker.port"),
        ("[broker]\nport = 70000\n", "broker.port"),
        ('[broker]\nnamespace = "Bad NS"\n', "broker.namespace"),
        ('[broker]\nprotocol = "v4"\n', "broker.protocol"),
        ('[broker.tls]\nkey_file = "k"\n', "key_file needs cert_file"),
        ("[broker\nhost = 1\n", "is not valid TOML"),
        ('[broker]\npassword_file = "missing"\n', "does not exist"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "host.toml", text)
    with pytest.raises(HostConfigError) as err:
        resolve_broker(flags("--config", str(cfg)))
    assert message in str(err.value)
    assert str(cfg) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_files_name_where_they_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HostConfigError, match=r"nope\.toml \(from --config\) does not exist"):
        resolve_broker(flags("--config", str(tmp_path / "nope.toml")))
    monkeypatch.setenv(hostconfig.ENV_VAR, str(tmp_path / "gone.toml"))
    with pytest.raises(HostConfigError, match=r"gone\.toml \(from \$EDGEFLEET_HOST_CONFIG\) does not exist"):
        resolve_broker(flags())
    monkeypatch.delenv(hostconfig.ENV_VAR)
    with pytest.raises(HostConfigError, match=r"password_file .*pw \(from command line\) does not exist"):
        resolve_broker(flags("--password-file", str(tmp_path / "pw")))
    empty = write(tmp_path / "empty", "")
    with pytest.raises(HostConfigError, match="is empty"):
        resolve_broker(flags("--password-file", str(empty)))


def test_a_cli_failure_is_one_line_on_stderr_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(tmp_path / "host.toml", '[broker]\nhots = "x"\n')
    assert cli.main(["fleet", "--from-broker", "--config", str(cfg)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err == f"edgefleet: {cfg}: unknown key broker.hots (did you mean 'host'?)"
    assert cli.main(["fleet", "--from-broker", "--tls-key", "k.pem"]) == cli.EXIT_FAILED
    assert "--tls-key needs --tls-cert" in capsys.readouterr().err


def test_collect_uses_the_same_loader(tmp_path: Path) -> None:
    cfg = write(tmp_path / "host.toml", '[broker]\nhost = "broker.lan"\nport = 1884\nnamespace = "lab"\n')
    parser = argparse.ArgumentParser()
    collect.register(parser.add_subparsers(), parents=[cli._broker_parent()])
    args = parser.parse_args(["collect", "--db", "x.db", "--config", str(cfg)])
    lines: list[str] = []
    o = collect.broker_options_from_args(args, client_id="edgefleet-collector-main", announce=lines.append)
    assert (o.host, o.port, o.namespace, o.client_id) == (
        "broker.lan",
        1884,
        "lab",
        "edgefleet-collector-main",
    )
    assert lines == [f"broker mqtt://broker.lan:1884 as anonymous (from {cfg})"]


# ------------------------------------------------------------------------------------------- integration


@pytest.fixture
def generated_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Path]]:
    """mosquitto on broker-config's own output (TLS + passwords), with its controller/host.toml."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with generated_tls_broker(tmp_path, ["pi-1"], controller_host="127.0.0.1") as (b, out, files):
        assert files.host_config == out / "controller" / "host.toml"
        yield b, out


@pytest.mark.integration
def test_host_command_with_only_the_generated_config_file(
    generated_broker: tuple[MosquittoBroker, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, out = generated_broker
    host_toml = out / "controller" / "host.toml"
    assert oct(host_toml.stat().st_mode & 0o777) == "0o600"
    # A device says it is online (its credentials from broker-config).
    status = wire.Status(device="pi-1", online=True, ts=1.0)
    dev = BrokerOptions(
        host="127.0.0.1",
        port=broker.port,
        username="pi-1",
        password=(out / "credentials" / "pi-1.password").read_text().strip(),
        tls_ca=out / "ca.crt",
        connect_timeout_s=5,
    )
    with MqttSession(dev) as session:
        session.publish(wire.Topics().status("pi-1"), status.to_json(), retain=True)
        session.flush()
    # The controller's view, found through $EDGEFLEET_HOST_CONFIG alone: no --host, --port, TLS or password.
    monkeypatch.setenv(hostconfig.ENV_VAR, str(host_toml))
    capsys.readouterr()
    assert cli.main(["fleet", "--json", "--from-broker"]) == cli.EXIT_OK
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first == f"broker mqtts://127.0.0.1:{broker.port} as {CONTROLLER_USER} (from {host_toml})"
    rows = json.loads(captured.out)
    assert [r["device"] for r in rows] == ["pi-1"]
    # The same through the user's config directory (what broker-config tells the operator to do).
    monkeypatch.delenv(hostconfig.ENV_VAR)
    user_dir = Path(os.environ["HOME"]) / ".config" / "edgefleet"
    user_dir.mkdir(parents=True)
    for f in (out / "controller").iterdir():
        (user_dir / f.name).write_bytes(f.read_bytes())
    assert cli.main(["fleet", "--json", "--from-broker"]) == cli.EXIT_OK
    assert capsys.readouterr().err.splitlines()[0].endswith(f"(from {user_dir / 'host.toml'})")
    # A flag still overrides the file: the wrong port fails, and the first line says so.
    wrong = str(free_port())
    argv = ["fleet", "--json", "--from-broker", "--port", wrong, "--timeout", "2"]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err.splitlines()
    origin = f"{user_dir / 'host.toml'} + command line"
    assert err[0] == f"broker mqtts://127.0.0.1:{wrong} as {CONTROLLER_USER} (from {origin})"


class _Closed(type(Path())):  # type: ignore[misc]
    """A path in a directory we may not search (e.g. /etc/edgefleet, root:edgefleet 0750)."""

    def is_file(self) -> bool:
        raise PermissionError(13, "Permission denied", str(self))


def test_an_unreadable_system_directory_is_an_error_not_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostconfig, "SYSTEM_CONFIG", _Closed("/etc/edgefleet/host.toml"))
    with pytest.raises(
        HostConfigError, match=r"/etc/edgefleet/host\.toml: permission denied \(pass --config"
    ):
        resolve_broker(flags())
