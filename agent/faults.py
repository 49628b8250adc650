"""Crash points for fault-injection tests: ``EDGEFLEET_CRASH_AT=<name>`` makes the agent SIGKILL itself there.

Only the kill -9 tests set the variable; unset (always, in production) every call is one string compare.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_ENV = "EDGEFLEET_CRASH_AT"
_CRASH_AT = os.environ.get(CRASH_ENV) or None


def crash_point(name: str) -> None:
    """SIGKILL this process if ``EDGEFLEET_CRASH_AT`` names this point (simulates a power cut)."""
    if _CRASH_AT is not None and name == _CRASH_AT:
        log.critical("fault injection: SIGKILL at %s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
