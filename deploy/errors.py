"""The deploy package's exception tree. Host commands print the message and exit non-zero::

DeployError
├── BrokerError        no broker binary, the broker would not start, or we cannot connect / were refused
├── BundleError        a bundle directory is missing, unreadable, or its manifest.json fails validation
├── SigningKeyError    the signing key is missing, unreadable or not Ed25519
├── PolicyError        a policy file is invalid (the message names the key)
├── PublishError       the broker did not acknowledge publishes in time, or refused them (ACL)
├── StateError         the broker does not hold what a command needs (e.g. no manifest for the model)
├── RolloutError       an illegal rollout transition, or no rollout to resume / show
└── CommandTimeout     a device did not answer a command within --wait
"""

from __future__ import annotations


class DeployError(Exception):
    """Base of everything the host side raises on purpose."""


class BrokerError(DeployError):
    """Broker missing, not starting, unreachable or refusing us."""


class BundleError(DeployError):
    """A bundle cannot be read or its manifest is invalid."""


class SigningKeyError(DeployError):
    """The fleet signing key cannot be used."""


class PolicyError(DeployError):
    """A selection policy is invalid."""


class PublishError(DeployError):
    """Publishing did not complete."""


class StateError(DeployError):
    """The retained fleet state lacks what a command needs."""


class RolloutError(DeployError):
    """A rollout cannot move as asked (illegal transition, nothing to resume, one already running)."""


class CommandTimeout(DeployError):
    """A device did not answer a command in time."""
