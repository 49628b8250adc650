"""Home Assistant MQTT discovery builders: moved to :mod:`agent.homeassistant` so the device agent can
publish them itself (the agent never imports ``deploy``). This module re-exports them for host code."""

from __future__ import annotations

from agent.homeassistant import (
    AVAILABILITY_TEMPLATE,
    CONNECTIVITY_TEMPLATE,
    DISCOVERY_PREFIX,
    OFFLINE,
    ONLINE,
    ORIGIN_NAME,
    TEMPERATURE_TEMPLATE,
    DeviceInfo,
    DiscoveryMessage,
    active_attributes_template,
    active_figure_template,
    active_variant_template,
    config_topic,
    discovery_messages,
    removal_messages,
    result_template,
)

__all__ = [
    "AVAILABILITY_TEMPLATE",
    "CONNECTIVITY_TEMPLATE",
    "DISCOVERY_PREFIX",
    "OFFLINE",
    "ONLINE",
    "ORIGIN_NAME",
    "TEMPERATURE_TEMPLATE",
    "DeviceInfo",
    "DiscoveryMessage",
    "active_attributes_template",
    "active_figure_template",
    "active_variant_template",
    "config_topic",
    "discovery_messages",
    "removal_messages",
    "result_template",
]
