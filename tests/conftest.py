"""Session-wide isolation from the machine the tests run on."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# A throwaway PostgreSQL (initdb + pg_ctl, stopped by PID) for the store tests: postgres, pg_url, store_url.
from pg_helpers import pg_url, postgres, store_url  # noqa: F401

# Host commands read the collector's database by default when it exists at its system path; the tests
# must decide from the broker or the database they set up, never from a real fleet's file (this one is
# in a fresh empty directory, so it never exists unless a test makes it).
_EMPTY = tempfile.mkdtemp(prefix="edgefleet-tests-")
atexit.register(shutil.rmtree, _EMPTY, ignore_errors=True)
os.environ["EDGEFLEET_COLLECTOR_DB"] = str(Path(_EMPTY) / "none.db")
