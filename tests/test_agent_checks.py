"""``edgefleet-agent --check-config`` checks what the daemon will need (agent.checks), with real files:
missing files, files the service user cannot read, bad PEM, a certificate that does not match its key or
was signed by another CA, bad public keys, the store; and ``--connect`` against a real mosquitto."""

from __future__ import annotations

import base64
import datetime as dt
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import generated_tls_broker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent import cli
from agent.checks import Level, ServiceUser, check_config, check_connect, resolve_service_user
from agent.config import load_config
from deploy.broker.spawn import MosquittoBroker, find_mosquitto, free_port

LOOP = "127.0.0.1"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files another user cannot read")


def _pub_b64() -> str:
    raw = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return base64.b64encode(raw).decode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None
) -> x509.Certificate:
    """Self-signed (a CA) when ``issuer`` is None, else signed by (issuer CN, issuer key)."""
    now = dt.datetime.now(dt.UTC)
    issuer_cn, issuer_key = issuer or (cn, key)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Pki:
    """A fleet CA, a client certificate + key it signed, and a stranger CA with its own client cert."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.ca, self.client, self.key = d / "ca.crt", d / "client.crt", d / "client.key"
        self.ca.write_bytes(_pem(_cert("fleet CA", ca_key)))
        self.client.write_bytes(_pem(_cert("pi-a", client_key, ("fleet CA", ca_key))))
        self.key.write_bytes(_pem_key(client_key))
        self.other_key = d / "other.key"
        self.other_key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
        self.stranger = d / "stranger.crt"  # pi-a's key, but signed by another CA
        self.stranger.write_bytes(_pem(_cert("pi-a", client_key, ("other CA", other_key))))
        for p in (self.ca, self.client, self.key, self.other_key, self.stranger):
            p.chmod(0o644)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def write(tmp_path: Path, body: str, trust: str | None = None) -> Path:
    trust = trust if trust is not None else f'[trust]\npublic_keys = ["{_pub_b64()}"]\n'
    cfg = tmp_path / "agent.toml"
    store = tmp_path / "store"
    cfg.write_text(f'[device]\nid = "pi-a"\n{body}\n{trust}[store]\npath = "{store}"\n', encoding="utf-8")
    return cfg


def results(cfg: Path, user: str | None = None) -> list[tuple[Level, str, str]]:
    config = load_config(cfg, verify_keys=False)
    who, found = resolve_service_user(user)
    return [(r.level, r.key, r.message) for r in [*found, *check_config(config, who)]]


def failures(cfg: Path, user: str | None = None) -> list[tuple[str, str]]:
    return [(k, m) for level, k, m in results(cfg, user) if level is Level.FAIL]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ files


def test_missing_password_and_ca_files_fail_with_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw, ca = tmp_path / "nope" / "mqtt-password", tmp_path / "nope" / "ca.crt"
    cfg = write(
        tmp_path,
        f'[mqtt]\nusername = "pi-a"\npassword_file = "{pw}"\n[mqtt.tls]\nca_file = "{ca}"\n',
    )
    code, out, err = run_cli(capsys, "--config", str(cfg), "--check-config", "--service-user", _me())
    assert code == 1 and "OK" not in out
    fail_lines = [ln for ln in err.splitlines() if ln.startswith("FAIL")]
    assert len(fail_lines) == 2, err
    pw_line = next(ln for ln in fail_lines if "mqtt.password_file" in ln)
    ca_line = next(ln for ln in fail_lines if "mqtt.tls.ca_file" in ln)
    assert str(pw) in pw_line and "does not exist" in pw_line and "provision" in pw_line
    assert str(ca) in ca_line and "does not exist" in ca_line and "ca.crt" in ca_line
    assert "2 check(s) failed" in err


def test_a_good_config_says_ok(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "mqtt-password"
    pw.write_text("s3cret\n")
    pw.chmod(0o640)
    cfg = write(
        tmp_path,
        f'[mqtt]\nusername = "pi-a"\npassword_file = "{pw}"\n[mqtt.tls]\nca_file = "{pki.ca}"\n'
        f'cert_file = "{pki.client}"\nkey_file = "{pki.key}"\n',
    )
    code, out, err = run_cli(capsys, "--config", str(cfg), "--check-config", "--service-user", _me())
    assert code == 0, err
    assert f"{cfg}: OK (device pi-a" in out and "FAIL" not in err


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's own tmp dirs are 0700, which would hide everything)."""
    d = Path(tempfile.mkdtemp(prefix="edgefleet-checks-"))
    d.chmod(0o755)
    for parent in d.parents:
        if parent.stat().st_mode & 0o001 == 0:
            pytest.skip(f"{parent} is not searchable by others")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@as_root
def test_files_the_service_user_cannot_read(open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path = open_dir
    pw = tmp_path / "mqtt-password"
    pw.write_text("s3cret\n")
    os.chown(pw, 0, 0)
    pw.chmod(0o600)
    cfg = write(tmp_path, f'[mqtt]\nusername = "pi-a"\npassword_file = "{pw}"\n')
    fails = failures(cfg, "nobody")
    pw_fails = [m for k, m in fails if k == "mqtt.password_file"]
    assert len(pw_fails) == 1 and "not readable by user nobody" in pw_fails[0] and "0600" in pw_fails[0]
    assert "chmod 0640" in pw_fails[0]
    # root itself can read it: no failure for the file when checking as root
    assert not [k for k, _ in failures(cfg, "root") if k == "mqtt.password_file"]
    # readable by others: fine for nobody too
    pw.chmod(0o644)
    assert not [k for k, _ in failures(cfg, "nobody") if k == "mqtt.password_file"]
    # a directory on the way that nobody cannot enter
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    hidden = secret / "mqtt-password"
    hidden.write_text("s3cret\n")
    hidden.chmod(0o644)
    cfg = write(tmp_path, f'[mqtt]\nusername = "pi-a"\npassword_file = "{hidden}"\n')
    msg = next(m for k, m in failures(cfg, "nobody") if k == "mqtt.password_file")
    assert f"directory {secret}" in msg and "not searchable" in msg
    # the store belongs to root (0755): nobody cannot write it
    store_fail = next(m for k, m in failures(cfg, "nobody") if k == "store.path")
    assert "not writable by user nobody" in store_fail and "install -d -o nobody" in store_fail
    # and through the CLI: exit 1, one line per failure
    code, _, err = run_cli(capsys, "--config", str(cfg), "--service-user", "nobody")
    assert code == 1 and err.count("FAIL: mqtt.password_file") == 1


def test_unknown_service_user_fails(tmp_path: Path) -> None:
    cfg = write(tmp_path, "")
    fails = failures(cfg, "no-such-user-here")
    assert fails and fails[0][0] == "--service-user" and "does not exist" in fails[0][1]


def test_store_that_can_be_created_is_fine(tmp_path: Path) -> None:
    cfg = write(tmp_path, "")
    found = [(lv, m) for lv, k, m in results(cfg, _me()) if k == "store.path"]
    assert found == [(Level.OK, f"{tmp_path / 'store'} does not exist yet; {_me()} can create it")]


# ------------------------------------------------------------------------------------------ TLS


def test_bad_pem_ca_file(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cfg = write(tmp_path, f'[mqtt.tls]\nca_file = "{bad}"\n')
    fails = failures(cfg, _me())
    assert [k for k, _ in fails] == ["mqtt.tls.ca_file"]
    assert "is not a PEM certificate" in fails[0][1] and str(bad) in fails[0][1]


def test_certificate_that_does_not_match_its_key(tmp_path: Path, pki: Pki) -> None:
    cfg = write(
        tmp_path,
        f'[mqtt.tls]\nca_file = "{pki.ca}"\ncert_file = "{pki.client}"\nkey_file = "{pki.other_key}"\n',
    )
    fails = failures(cfg, _me())
    assert [k for k, _ in fails] == ["mqtt.tls.key_file"]
    assert "does not belong to the certificate" in fails[0][1] and str(pki.other_key) in fails[0][1]


def test_certificate_signed_by_another_ca(tmp_path: Path, pki: Pki) -> None:
    cfg = write(
        tmp_path,
        f'[mqtt.tls]\nca_file = "{pki.ca}"\ncert_file = "{pki.stranger}"\nkey_file = "{pki.key}"\n',
    )
    fails = failures(cfg, _me())
    assert [k for k, _ in fails] == ["mqtt.tls.cert_file"]
    assert "is not signed by the CA" in fails[0][1] and str(pki.ca) in fails[0][1]


def test_encrypted_or_garbage_key(tmp_path: Path, pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    cfg = write(
        tmp_path, f'[mqtt.tls]\nca_file = "{pki.ca}"\ncert_file = "{pki.client}"\nkey_file = "{enc}"\n'
    )
    assert [m for k, m in failures(cfg, _me()) if "encrypted" in m]
    enc.write_text("garbage\n")
    assert [m for k, m in failures(cfg, _me()) if "not a PEM private key" in m]


# ------------------------------------------------------------------------------------------ trusted keys


def test_bad_public_keys_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_file = tmp_path / "fleet.pub"
    bad_file.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    missing = tmp_path / "missing.pub"
    trust = (
        f'[trust]\npublic_keys = ["{_pub_b64()}", "not-a-key"]\n'
        f'public_key_files = ["{bad_file}", "{missing}"]\n'
    )
    cfg = write(tmp_path, "", trust=trust)
    code, _, err = run_cli(capsys, "--config", str(cfg), "--check-config", "--service-user", _me())
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("FAIL")]
    assert len(lines) == 3, err
    assert any("trust.public_keys[1]" in ln and "not an Ed25519 public key" in ln for ln in lines)
    assert any("trust.public_key_files[0]" in ln and str(bad_file) in ln for ln in lines)
    assert any("trust.public_key_files[1]" in ln and "does not exist" in ln for ln in lines)
    # the daemon itself still refuses such a config at load
    assert cli.main(["--config", str(tmp_path / "agent.toml"), "--log-level", "error"]) == 1


# ------------------------------------------------------------------------------------------ --connect


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path]]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with generated_tls_broker(tmp_path_factory.mktemp("chk"), ["pi-a"]) as (b, out, _):
        yield b, out


def _broker_config(
    tmp_path: Path, broker: MosquittoBroker, out: Path, password: str, tls: bool = True
) -> Path:
    pw = tmp_path / "mqtt-password"
    pw.write_text(password + "\n")
    pw.chmod(0o640)
    tls_part = f'[mqtt.tls]\nca_file = "{out / "ca.crt"}"\n' if tls else ""
    return write(
        tmp_path,
        f'[mqtt]\nhost = "{LOOP}"\nport = {broker.port}\nusername = "pi-a"\npassword_file = "{pw}"\n'
        f"connect_timeout_s = 5\n{tls_part}",
    )


def test_connect_with_good_and_bad_credentials(
    tmp_path: Path, tls_broker: tuple[MosquittoBroker, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, out = tls_broker
    good = (out / "credentials" / "pi-a.password").read_text().strip()
    cfg = _broker_config(tmp_path, broker, out, good)
    code, stdout, err = run_cli(capsys, "--config", str(cfg), "--connect", "--service-user", _me())
    assert code == 0, err
    assert f"broker {LOOP}:{broker.port} accepted pi-a over TLS (CONNACK Success)" in stdout
    assert "OK (device pi-a" in stdout

    cfg = _broker_config(tmp_path, broker, out, "wrong-password")
    code, stdout, err = run_cli(capsys, "--config", str(cfg), "--connect", "--service-user", _me())
    assert code == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("FAIL: mqtt:"))
    assert "not authorized" in line and "mqtt.password_file" in line, line

    # plain TCP to the TLS listener: named, not a bare timeout
    cfg = _broker_config(tmp_path, broker, out, good, tls=False)
    found = check_connect(load_config(cfg), timeout_s=5)
    assert len(found) == 1 and found[0].failed and "TLS expected" in found[0].message


def test_connect_to_a_refused_port_fails_fast(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path, f'[mqtt]\nhost = "{LOOP}"\nport = {port}\n')
    found = check_connect(load_config(cfg), timeout_s=5)
    assert len(found) == 1 and found[0].failed and "connection refused" in found[0].message


def test_service_user_access_model() -> None:
    """The mode-bit model the checks use for another user (owner, group, other; root reads everything)."""
    nobody = ServiceUser("nobody", 65534, frozenset({65534}))
    root = ServiceUser("root", 0, frozenset({0}))

    class St:
        def __init__(self, uid: int, gid: int, mode: int) -> None:
            self.st_uid, self.st_gid, self.st_mode = uid, gid, mode

    f600 = St(0, 0, 0o100600)
    assert not nobody.may(f600, "r") and root.may(f600, "r")  # type: ignore[arg-type]
    assert nobody.may(St(0, 65534, 0o100640), "r")  # type: ignore[arg-type]
    assert nobody.may(St(65534, 0, 0o100600), "r")  # type: ignore[arg-type]
    assert not nobody.may(St(0, 0, 0o040750), "x") and nobody.may(St(0, 0, 0o040751), "x")  # type: ignore[arg-type]
