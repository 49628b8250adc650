"""The host's broker connection, from a TOML file, so host commands need no broker flags.

Lookup, first match wins:

1. ``--config FILE`` on the command line (must exist)
2. the environment variable ``EDGEFLEET_HOST_CONFIG`` (must exist)
3. ``~/.config/edgefleet/host.toml``
4. ``/etc/edgefleet/host.toml``
5. built-in defaults (127.0.0.1:1883, anonymous, MQTT v5, namespace ``edgefleet``)

Broker flags given on the command line override the file key by key. ``edgefleet broker-config``
writes one for the controller (``controller/host.toml``)::

    [broker]
    host = "broker.lan"
    port = 8883                      # default: 8883 with TLS, else 1883
    # or several nodes of a clustered broker, tried in turn (replaces host/port; flag: --broker):
    # endpoints = ["n1.lan:8883", "n2.lan:8883@broker.lan"]
    username = "edgefleet-controller"
    password_file = "edgefleet-controller.password"   # relative: next to this file
    namespace = "edgefleet"
    protocol = "v5"                  # or "v311"
    timeout_s = 10.0                 # connect / ack timeout

    [broker.tls]                     # TLS when ca_file or cert_file is given
    ca_file = "ca.crt"
    cert_file = "client.crt"         # client certificate instead of a password (optional)
    key_file = "client.key"

Relative paths in the file are relative to the file's directory (so the directory can be copied
anywhere as is); ``~`` is expanded. Paths given as flags are relative to the working directory.

Every problem is one :class:`HostConfigError` line naming the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent import wire
from agent.mqttclient import Endpoint
from deploy.broker.client import BrokerOptions
from deploy.errors import DeployError

ENV_VAR = "EDGEFLEET_HOST_CONFIG"
SYSTEM_CONFIG = Path("/etc/edgefleet/host.toml")
CONFIG_NAME = "host.toml"


def user_config() -> Path:
    return Path.home() / ".config" / "edgefleet" / CONFIG_NAME


class HostConfigError(DeployError):
    """The host configuration file is missing, not TOML, or has an unknown or invalid key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Strict):
    ca_file: Path | None = Field(default=None, description="CA certificate that signed the broker's")
    cert_file: Path | None = Field(default=None, description="client certificate (certificate auth)")
    key_file: Path | None = Field(default=None, description="client certificate's private key")

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class BrokerSettings(_Strict):
    host: str = Field(default="127.0.0.1", min_length=1, description="broker host name or address")
    port: int | None = Field(default=None, ge=1, le=65535, description="default: 8883 with TLS, else 1883")
    endpoints: list[Endpoint] = Field(
        default_factory=list,
        description='several broker nodes, tried in turn ("host:port" or "host:port@tls-name"); '
        "replace host/port",
    )
    username: str | None = Field(default=None, min_length=1)
    password_file: Path | None = Field(default=None, description="first line is the password")
    namespace: wire.Identifier = wire.DEFAULT_NAMESPACE
    protocol: Literal["v5", "v311"] = "v5"
    timeout_s: float = Field(default=10.0, gt=0, description="connect / ack timeout, seconds")
    tls: TlsSettings | None = None


class HostConfig(_Strict):
    broker: BrokerSettings = BrokerSettings()


# argparse dest → (section, key) in the file; what _broker_parent in deploy.cli defines.
_FLAGS: dict[str, tuple[str | None, str]] = {
    "host": (None, "host"),
    "port": (None, "port"),
    "broker": (None, "endpoints"),
    "username": (None, "username"),
    "password_file": (None, "password_file"),
    "namespace": (None, "namespace"),
    "mqtt": (None, "protocol"),
    "timeout": (None, "timeout_s"),
    "tls_ca": ("tls", "ca_file"),
    "tls_cert": ("tls", "cert_file"),
    "tls_key": ("tls", "key_file"),
}


def find_config(explicit: Path | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """The file the lookup order picks, or None for the built-in defaults."""
    if explicit is not None:
        if not explicit.is_file():
            raise HostConfigError(f"host config {explicit} (from --config) does not exist")
        return explicit
    env = os.environ if env is None else env
    named = env.get(ENV_VAR)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise HostConfigError(f"host config {path} (from ${ENV_VAR}) does not exist")
        return path
    for path in (user_config(), SYSTEM_CONFIG):
        try:
            if path.is_file():
                return path
        except PermissionError as err:
            # Falling back to the defaults here would talk to another broker without a word.
            raise HostConfigError(
                f"cannot look for host config {path}: permission denied (pass --config FILE, or read it "
                f"as a user that may, e.g. a member of {path.parent}'s group)"
            ) from err
    return None


def load_host_config(path: Path) -> HostConfig:
    """Read and validate ``path``; relative paths in it become relative to its directory."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise HostConfigError(f"host config {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise HostConfigError(f"cannot read host config {path}: {reason}") from err
    except tomllib.TOMLDecodeError as err:
        raise HostConfigError(f"{path} is not valid TOML: {err}") from err
    return parse_host_config(raw, source=path)


def parse_host_config(raw: dict[str, Any], source: Path | None = None) -> HostConfig:
    name = str(source) if source is not None else "host config"
    try:
        config = HostConfig.model_validate(raw)
    except ValidationError as err:
        raise HostConfigError(f"{name}: " + "; ".join(_describe(e) for e in err.errors())) from err
    return config if source is None else _anchor(config, source.parent)


def _describe(error: Any) -> str:
    loc = tuple(str(p) for p in error["loc"])
    where = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where}{_did_you_mean(loc)}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where}: {error['msg']}{shown}"


def _did_you_mean(loc: tuple[str, ...]) -> str:
    model: Any = HostConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            return ""
        model = next((a for a in getattr(field.annotation, "__args__", (field.annotation,)) if a), None)
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _anchor(config: HostConfig, base: Path) -> HostConfig:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    b = config.broker
    tls = None
    if b.tls is not None:
        tls = b.tls.model_copy(
            update={
                "ca_file": fix(b.tls.ca_file),
                "cert_file": fix(b.tls.cert_file),
                "key_file": fix(b.tls.key_file),
            }
        )
    broker = b.model_copy(update={"password_file": fix(b.password_file), "tls": tls})
    return config.model_copy(update={"broker": broker})


# ------------------------------------------------------------------------------------------------ resolve


@dataclass(frozen=True)
class ResolvedBroker:
    """The options a host command connects with, and where they came from (for its first line)."""

    options: BrokerOptions
    source: Path | None  # the config file, None for built-in defaults
    overridden: tuple[str, ...] = ()  # flags given on the command line

    def describe(self) -> str:
        o = self.options
        scheme = "mqtts" if (o.tls_ca or o.tls_cert) else "mqtt"
        host = f"[{o.host}]" if ":" in o.host else o.host
        who = o.username or (f"certificate {o.tls_cert}" if o.tls_cert else "anonymous")
        # Say plainly when the host itself is a default: that silently hid a missing --host before.
        if self.source is None and "host" in self.overridden:
            origin = "command line"
        else:
            base = "built-in defaults" if self.source is None else str(self.source)
            origin = base + (" + command line" if self.overridden else "")
        where = f"{host}:{o.port}"
        if len(o.endpoints) > 1:
            where = ",".join(str(e) for e in o.endpoints)
        return f"broker {scheme}://{where} as {who} (from {origin})"


def resolve_broker(args: argparse.Namespace, client_id: str | None = None) -> ResolvedBroker:
    """BrokerOptions from the lookup order above, overridden by the broker flags that were given.

    Flags the parser does not define, and flags left at None (not given), do not override.
    """
    path = find_config(getattr(args, "config", None))
    config = load_host_config(path) if path is not None else HostConfig()
    data = config.broker.model_dump()
    tls: dict[str, Any] = dict(data.get("tls") or {})
    given = []
    for dest, (section, key) in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        given.append(dest)
        if dest == "broker":  # --broker repeated and/or comma lists
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        (tls if section == "tls" else data)[key] = value
    data["tls"] = tls or None
    if {"host", "port"} & set(given) and "broker" not in given:
        data["endpoints"] = []  # --host/--port on the command line replace the file's endpoint list
    try:
        broker = BrokerSettings.model_validate(data)
    except ValidationError as err:
        raise HostConfigError(
            "broker settings (file and flags): " + "; ".join(_describe(e) for e in err.errors())
        ) from err
    origin = {dest: "command line" if dest in given else str(path or "defaults") for dest in _FLAGS}
    t = broker.tls or TlsSettings()
    for dest, value in (
        ("password_file", broker.password_file),
        ("tls_ca", t.ca_file),
        ("tls_cert", t.cert_file),
        ("tls_key", t.key_file),
    ):
        if value is not None and not value.is_file():
            key = _FLAGS[dest][1]
            raise HostConfigError(f"{key} {value} (from {origin[dest]}) does not exist")
    password = _read_password(broker.password_file, origin["password_file"])
    tls_on = t.ca_file is not None or t.cert_file is not None
    endpoints = tuple(broker.endpoints)
    options = BrokerOptions(
        host=endpoints[0].host if endpoints else broker.host,
        port=endpoints[0].port if endpoints else broker.port or (8883 if tls_on else 1883),
        endpoints=endpoints,
        username=broker.username,
        password=password,
        tls_ca=t.ca_file,
        tls_cert=t.cert_file,
        tls_key=t.key_file,
        protocol=broker.protocol,
        namespace=broker.namespace,
        client_id=client_id,
        connect_timeout_s=broker.timeout_s,
    )
    return ResolvedBroker(options, path, tuple(given))


def _read_password(path: Path | None, origin: str) -> str | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise HostConfigError(f"cannot read the password file {path} (from {origin}): {reason}") from err
    if not lines or not lines[0]:
        raise HostConfigError(f"the password file {path} (from {origin}) is empty")
    return lines[0]
