"""The fleet signing key: create it once on the host, load it to sign manifests and assignments.

Layout of the key directory (default ``$EDGEFLEET_HOME`` or ``~/.config/edgefleet``)::

    signing.key     Ed25519 private key, PKCS#8 PEM, mode 0600 (never leaves the host)
    signing.pub     the public key as base64 of its 32 raw bytes (goes into every agent.toml)

The key id (first 16 hex digits of sha256 over the raw public key) is what signatures name.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from agent import wire
from deploy.errors import SigningKeyError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


def default_key_dir() -> Path:
    home = os.environ.get("EDGEFLEET_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".config" / "edgefleet"


def default_key_path() -> Path:
    return default_key_dir() / PRIVATE_NAME


@dataclass(frozen=True, slots=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str
    public_text: str


def public_text(public_key: Ed25519PublicKey) -> str:
    """The form agents take in their config: base64 of the 32 raw bytes."""
    return base64.b64encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def init_keys(key_dir: Path | None = None, force: bool = False) -> KeyPair:
    """Create a new signing key pair in ``key_dir``; refuse to overwrite one unless ``force``."""
    key_dir = key_dir or default_key_dir()
    private_path = key_dir / PRIVATE_NAME
    public_path = key_dir / PUBLIC_NAME
    if private_path.exists() and not force:
        raise SigningKeyError(
            f"{private_path} already exists; refusing to overwrite the fleet signing key "
            "(every device trusts it). Use --force to replace it."
        )
    try:
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = private_path.with_name(private_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask
            os.replace(tmp, private_path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        text = public_text(key.public_key())
        public_path.write_text(text + "\n", encoding="ascii")
    except OSError as err:
        raise SigningKeyError(f"cannot write the signing key in {key_dir}: {err}") from err
    return KeyPair(private_path, public_path, wire.key_id_for(key.public_key()), text)


def load_signing_key(path: Path | str | None = None) -> Ed25519PrivateKey:
    """Load the Ed25519 private key at ``path`` (default: the key dir's signing.key)."""
    path = Path(path) if path is not None else default_key_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise SigningKeyError(
            f"signing key {path} does not exist: create one with `edgefleet keys init` or pass --key"
        ) from err
    except OSError as err:
        raise SigningKeyError(f"cannot read signing key {path}: {err}") from err
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def trusted_keys(key: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    """The ``trusted`` mapping verify_signed expects, for this key's public half."""
    pub = key.public_key()
    return {wire.key_id_for(pub): pub}
