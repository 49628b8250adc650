"""Agent configuration: TOML validated by pydantic, unknown keys rejected, errors that name the key.

Example ``/etc/edgefleet/agent.toml``::

    [device]
    id = "pi-kitchen"
    class = "accurate"          # operator's device class, used by selection policies

    [mqtt]
    host = "broker.lan"
    port = 8883
    # or a clustered broker's nodes, tried in turn: endpoints = ["n1.lan:8883", "n2.lan:8883"]
    username = "pi-kitchen"
    password_file = "/etc/edgefleet/mqtt-password"
    [mqtt.tls]
    ca_file = "/etc/edgefleet/ca.crt"

    [trust]
    public_keys = ["MCowBQYDK2VwAyEA..."]   # base64 raw Ed25519 keys or PEM, several for rotation

    [store]
    path = "/var/lib/edgefleet"

    [bench]
    threads = [1, "all"]        # thread sweep; "all" (or 0) = every usable CPU

    [energy]
    kind = "auto"               # hwmon, pmic, rapl, battery, then the utilisation model
    idle_seconds = 1.0          # idle baseline before each run (measured backends)

    [thermal]
    cool_below_c = 70.0         # wait (≤ cool_timeout_s) until the CPU is below this before each run
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from agent.energy import EnergyConfig
from agent.errors import ConfigError
from agent.mqttclient import Endpoint, endpoints_or_default
from agent.thermal import ThermalConfig
from agent.wire import DEFAULT_NAMESPACE, ID_PATTERN, Identifier, key_id_for, public_key_from_text

DEFAULT_CONFIG_PATH = Path("/etc/edgefleet/agent.toml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DeviceConfig(_Strict):
    id: Identifier = Field(description="device id used in every topic")
    device_class: Identifier | None = Field(
        default=None, alias="class", description="operator's device class (selection policies key on it)"
    )
    board: str | None = Field(default=None, description="override the detected board name")


class TlsConfig(_Strict):
    ca_file: Path | None = Field(
        default=None, description="CA certificate that signed the broker's certificate"
    )
    cert_file: Path | None = Field(default=None, description="client certificate (certificate auth)")
    key_file: Path | None = Field(default=None, description="client private key (certificate auth)")
    insecure: bool = Field(default=False, description="skip hostname check (lab use only)")

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    endpoints: list[Endpoint] = Field(
        default_factory=list,
        description='several broker nodes, tried in turn on connection loss: "host:port", '
        '"host:port@tls-server-name" or {host, port, server_name} tables; replaces host/port',
    )
    chunk_qos: Literal[0, 1] = Field(
        default=1,
        description="QoS of blob chunk subscriptions; 0 on NATS, where every QoS1 subscription is a "
        "JetStream consumer (chunks are re-requested on reconnect and checked by sha256 either way)",
    )
    namespace: Annotated[str, StringConstraints(pattern=ID_PATTERN)] = DEFAULT_NAMESPACE
    protocol: Literal["v5", "v311"] = Field(default="v5", description="MQTT v5 unless the broker lacks it")
    client_id: str | None = Field(default=None, description="default: edgefleet-agent-<device id>")
    username: str | None = None
    password: str | None = Field(default=None, description="prefer password_file")
    password_file: Path | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="broker keeps assignments/commands this long while offline"
    )
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=15.0, gt=0)
    max_payload_kb: int = Field(
        default=4096, ge=16, le=65536, description="JSON messages larger than this are refused (TOO_LARGE)"
    )

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.endpoints and {"host", "port"} & self.model_fields_set:
            raise ValueError("give either host/port or endpoints, not both")
        addresses = [e.address for e in self.endpoints]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"endpoints repeat an address: {', '.join(addresses)}")
        return self

    def broker_endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints to rotate through: ``endpoints``, or the one ``host:port``."""
        return endpoints_or_default(self.endpoints, self.host, self.port)


class TrustConfig(_Strict):
    public_keys: list[str] = Field(default_factory=list, description="base64 raw Ed25519 keys or PEM")
    public_key_files: list[Path] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_key(self) -> Self:
        if not self.public_keys and not self.public_key_files:
            raise ValueError("at least one trusted public key is required (public_keys or public_key_files)")
        return self


class StoreConfig(_Strict):
    path: Path = Path("/var/lib/edgefleet")
    disk_budget_mb: float = Field(default=512, gt=0, description="blobs kept under this budget (GC)")
    min_free_mb: float = Field(default=64, ge=0, description="refuse a fetch that would leave less free")


class FetchConfig(_Strict):
    timeout_s: float = Field(
        default=300.0, gt=0, description="give up a variant when none of its chunks arrived for this long"
    )
    window: int = Field(default=32, ge=1, le=32, description="chunk topics subscribed at a time (<= 32)")


class ModelsConfig(_Strict):
    follow: list[Identifier] = Field(default_factory=list, description="models to follow; empty = all")


def _one_thread() -> list[int | Literal["all"]]:
    return [1]


class BenchConfig(_Strict):
    """``[bench]``: how each variant is benchmarked (method after TFLite's benchmark_model).

    Per variant and thread count, in a child process: load + allocate (``init_ms``), one first inference,
    accuracy and top-1 predictions on the bundle's sample, ``warmup_runs`` discarded, then timed runs until
    at least ``min_runs`` runs AND at least ``min_seconds`` have passed (``max_runs`` caps it). A timed
    window that other processes disturbed past ``max_other_share`` / ``max_involuntary_per_s``
    (:mod:`agent.contention`) is run again, at most ``max_retries`` times; a result still disturbed is
    published with ``contended: true`` and its figures. Defaults of 2 s and 100 runs: one-second windows
    of 57-127 runs were too short to be stable under a competing application.
    """

    threads: list[int | Literal["all"]] = Field(
        default_factory=_one_thread,
        min_length=1,
        description='thread sweep: each entry is a num_threads to benchmark with; 0 or "all" = every CPU '
        "this process may use (os.sched_getaffinity). Duplicates after resolving run once",
    )
    warmup_runs: int = Field(default=5, ge=0, description="inferences run and discarded before timing")
    min_runs: int = Field(default=100, ge=1, description="timed inferences, at least")
    min_seconds: float = Field(default=2.0, ge=0, description="timed loop lasts at least this long")
    max_runs: int = Field(
        default=100_000,
        ge=1,
        description="timed inferences, at most (a model faster than min_seconds / max_runs ends sooner)",
    )
    max_eval: int = Field(
        default=1000, ge=0, description="sample rows scored for accuracy/agreement (0 = skip the sample)"
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="wall clock per variant, then the child is killed (RUN_TIMEOUT)"
    )
    memory_limit_mb: int = Field(
        default=1024, ge=64, description="address-space limit (RLIMIT_AS) of the child (OOM beyond)"
    )
    accuracy_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="ACCURACY_MISMATCH when on-device accuracy differs from the host's by more than this "
        "(either direction)",
    )
    max_retries: int = Field(
        default=2, ge=0, le=10, description="a disturbed timed window is run again at most this many times"
    )
    max_other_share: float = Field(
        default=0.10,
        ge=0,
        le=1,
        description="disturbed when other processes used more than this share of the child's cores",
    )
    max_involuntary_per_s: float = Field(
        default=50.0, ge=0, description="disturbed past this many involuntary context switches per second"
    )

    @model_validator(mode="after")
    def _runs(self) -> Self:
        if self.max_runs < self.min_runs:
            raise ValueError("max_runs must be >= min_runs")
        if any(t != "all" and t < 0 for t in self.threads):
            raise ValueError('threads must all be >= 1, or 0 / "all" for every CPU')
        return self

    def thread_counts(self, cpus: int | None = None) -> list[int]:
        """The sweep as positive ints, in order, duplicates removed; 0/"all" become ``cpus``."""
        n = cpus if cpus is not None else _usable_cpus()
        out: list[int] = []
        for t in self.threads:
            count = t if isinstance(t, int) and t > 0 else n
            if count not in out:
                out.append(count)
        return out


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class HealthConfig(_Strict):
    inferences: int = Field(default=8, ge=1)
    probation_s: float = Field(default=5.0, ge=0, description="wait after activation before commit")
    timeout_s: float = Field(default=60.0, gt=0)
    accuracy_tolerance: float = Field(
        default=0.05, ge=0, le=1, description="roll back when sample accuracy < host accuracy - this"
    )
    max_eval: int = Field(default=200, ge=1, description="sample rows scored by the health check")


class CommandsConfig(_Strict):
    max_age_s: float = Field(
        default=600.0, gt=0, description="refuse commands whose issued_at is older than this (stale/replay)"
    )


class TelemetryConfig(_Strict):
    interval_s: float = Field(default=60.0, ge=1)
    home_assistant: bool = Field(default=False, description="publish Home Assistant MQTT discovery")


class AgentConfig(_Strict):
    device: DeviceConfig
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    trust: TrustConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    thermal: ThermalConfig = Field(default_factory=ThermalConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id → public key, from inline keys and key files. Raises ConfigError on a bad key."""
        texts: list[tuple[str, str]] = [
            (f"trust.public_keys[{i}]", k) for i, k in enumerate(self.trust.public_keys)
        ]
        for path in self.trust.public_key_files:
            try:
                texts.append((str(path), path.read_text(encoding="ascii")))
            except OSError as err:
                raise ConfigError(f"trust.public_key_files: cannot read {path}: {err.strerror}") from err
        keys: dict[str, Ed25519PublicKey] = {}
        for where, text in texts:
            try:
                key = public_key_from_text(text)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from err
            except Exception as err:
                raise ConfigError(f"{where}: {err}") from err
            keys[key_id_for(key)] = key
        return keys

    def mqtt_password(self) -> str | None:
        if self.mqtt.password_file is None:
            return self.mqtt.password
        try:
            return self.mqtt.password_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(
                f"mqtt.password_file: cannot read {self.mqtt.password_file}: {err.strerror}"
            ) from err


def load_config(path: Path, *, verify_keys: bool = True) -> AgentConfig:
    """Read and validate ``path``; every problem becomes one ConfigError listing each bad key.

    ``verify_keys=False`` leaves the trusted keys undecoded (``--check-config`` reports each bad one itself).
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist (use --config PATH)") from err
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    return parse_config(raw, source=str(path), verify_keys=verify_keys)


def parse_config(raw: dict[str, Any], source: str = "<config>", *, verify_keys: bool = True) -> AgentConfig:
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"{source} is invalid:\n" + "\n".join(_describe(e, raw) for e in err.errors())
        ) from err
    if verify_keys:
        config.trusted_keys()  # fail now, not at the first manifest
    return config


def _describe(error: Any, raw: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        hint = _did_you_mean(error["loc"], raw)
        return f"  {loc}: unknown key{hint}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"  {loc}: {error['msg']}{shown}"


def _did_you_mean(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    model: Any = AgentConfig
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return ""
        model = field.annotation
        model = next((a for a in getattr(model, "__args__", (model,)) if hasattr(a, "model_fields")), model)
    fields = getattr(model, "model_fields", {})
    names = [f.alias or n for n, f in fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(sorted(names))}"
