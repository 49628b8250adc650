"""The agent's exception tree. Anything the daemon refuses or cannot do raises one of these::

    AgentError
    ├── ConfigError          agent.toml is missing, unreadable or invalid (exit 1, message names the key)
    ├── ConnectionFatal      the broker refused us for a reason retrying cannot fix (bad credentials)
    ├── StoreError           the device store cannot do what was asked
    │   ├── DiskFullError    not enough free space or budget for a fetch (reason DISK_FULL)
    │   └── IntegrityError   a chunk or blob whose bytes do not match the manifest (reason BAD_HASH/BAD_SIZE)
    ├── IllegalTransition    a model's state machine was asked for a move its table forbids
    └── RuntimeMissing       no TFLite runtime (ai-edge-litert, tflite-runtime or tensorflow) is importable

Wire-level refusals (bad signature, malformed payload, bad identifier) are ``agent.wire.WireError``.
Errors that become an Event carry a typed ``reason`` (:class:`agent.wire.ReasonCode`), never a string:
this module imports ``agent.wire`` (which imports nothing from the agent), not the other way round.
"""

from __future__ import annotations

from agent.wire import ReasonCode


class AgentError(Exception):
    """Base of everything the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration cannot be used; the message says which key and why."""


class ConnectionFatal(AgentError):
    """The broker refused the connection for a reason that retrying will not fix."""


class StoreError(AgentError):
    """The device store could not complete an operation."""


class DiskFullError(StoreError):
    """A fetch or write would exceed the free-space floor or the disk budget."""


class IntegrityError(StoreError):
    """Bytes that do not hash to, or are not as long as, what the manifest says. ``reason`` is the code."""

    def __init__(self, message: str, reason: ReasonCode = ReasonCode.BAD_HASH) -> None:
        super().__init__(message)
        self.reason = reason


class IllegalTransition(AgentError):
    """A state change the transition table forbids."""


class RuntimeMissing(AgentError):
    """No TFLite runtime could be imported."""
