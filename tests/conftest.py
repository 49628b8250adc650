"""Session-wide isolation from the machine the tests run on."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# A throwaway PostgreSQL (initdb + pg_ctl, stopped by PID) for the store tests: postgres, pg_url, store_url.
from pg_helpers import pg_url, postgres, store_url  # noqa: F401

# Host commands read the collector's database by default when it exists at its system path; the tests
# must decide from the database they set up (--db) or say --from-broker, never from a real fleet's file
# (this one is in a fresh empty directory, so it never exists unless a test makes it).
_EMPTY = tempfile.mkdtemp(prefix="edgefleet-tests-")
atexit.register(shutil.rmtree, _EMPTY, ignore_errors=True)
os.environ["EDGEFLEET_COLLECTOR_DB"] = str(Path(_EMPTY) / "none.db")


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers() -> Iterator[None]:
    """A CLI main called in-process (agent, collect, controller) runs logging.basicConfig, which binds a
    root StreamHandler to that test's captured stderr; pytest closes the stream afterwards, and every
    later log line from any test's thread then prints "--- Logging error ---" into another test's
    output. Remove what a test added (plain StreamHandlers only: pytest's own handlers are subclasses)."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
