"""A throwaway PostgreSQL for the tests and the benches: ``initdb`` and ``pg_ctl`` from Debian's
/usr/lib/postgresql/*/bin in a temporary directory, on a free loopback port, stopped by its PID.

Never a server already running on the machine. PostgreSQL refuses to run as root: as root, the cluster
runs as the ``postgres`` system user (created by the Debian package) in a directory chowned to it; as
anyone else, as the current user. When the binaries are missing and we are root, the Debian package
``postgresql`` is installed (as ``scripts/setup.sh`` does) and the cluster the package starts is stopped
(it is never used); otherwise the tests that need PostgreSQL are skipped with the reason.

For a bench::

    from pg_helpers import throwaway_postgres
    with throwaway_postgres() as url:          # postgresql://edgefleet@127.0.0.1:PORT/fleet
        ...

Fixtures (registered in conftest.py): ``postgres`` (session: one server), ``pg_url`` (a fresh database
on it), ``store_url`` (parametrised: an SQLite path, then a PostgreSQL URL).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest

from deploy.broker.spawn import free_port

USER = "edgefleet"  # the cluster's superuser (trust authentication on loopback: a test cluster)
_SETTINGS = (
    # A throwaway cluster: no fsync (a crash of the server process still loses nothing: the WAL is in
    # the OS cache), small memory, few connections.
    "-c fsync=off -c full_page_writes=off -c shared_buffers=32MB -c max_connections=60 "
    "-c listen_addresses=127.0.0.1"
)


def pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin holding initdb and pg_ctl (None if there is none)."""
    found = sorted(
        (Path(p).parent for p in glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    found = [b for b in found if (b / "pg_ctl").exists()]
    return found[-1] if found else None


def _install_debian_package() -> str | None:
    """apt-get install postgresql (root only); None on success, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql, as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    for step in ([], [["apt-get", "update", "-qq"]]):
        try:
            for cmd in step:
                subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
            done = subprocess.run(install, env=env, capture_output=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            return "installing the postgresql package timed out"
        if done.returncode == 0:
            _stop_packaged_clusters()
            return None
    return f"cannot install the postgresql package: {done.stderr.decode(errors='replace').strip()[-200:]}"


def _stop_packaged_clusters() -> None:
    """The package starts a cluster on 5432; the tests never use it: stop it."""
    try:
        listed = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in listed.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3] == "online":
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(["pg_ctlcluster", parts[0], parts[1], "stop"], timeout=60, check=False)


def unavailable_reason() -> str | None:
    """Why no throwaway PostgreSQL can run here (None: it can); installs the package if root."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]', part of edgefleet[host])"
    if pg_bin() is None:
        why = _install_debian_package()
        if why is not None:
            return why
        if pg_bin() is None:
            return "the postgresql package installed no /usr/lib/postgresql/*/bin/initdb"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class PostgresServer:
    """One cluster in its own temporary directory; ``start``/``stop``/``kill`` keep its data and port."""

    def __init__(self, base: Path | None = None) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        self.bin = bindir
        self.root = os.geteuid() == 0
        # As root the directory must be reachable by "postgres": pytest's tmp dirs are 0700 root.
        if base is not None and not self.root:
            base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-", dir=None if self.root else base))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = 0
        self.pid: int | None = None
        self._dbs = itertools.count()
        if self.root:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout_s=120,
        )

    def _run(self, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        tool = Path(argv[0]).name
        if self.root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=self.dir
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool}: {(done.stderr or done.stdout).strip()[-500:]}")
        return done

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 30.0) -> PostgresServer:
        """pg_ctl start on a free loopback port (the same port again after a stop, if it was started)."""
        last: Exception | None = None
        for _ in range(3):  # a free port may be taken between the check and the bind
            port = self.port or free_port()
            options = f"-p {port} -k {self.dir} {_SETTINGS}"
            try:
                self._run(
                    [
                        str(self.bin / "pg_ctl"),
                        "-D",
                        str(self.data),
                        "-l",
                        str(self.log),
                        "-w",
                        "-t",
                        str(int(timeout_s)),
                        "-o",
                        options,
                        "start",
                    ],
                    timeout_s=timeout_s + 10,
                )
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                last = err
                if self.port:
                    break
                continue
            self.port = port
            self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
            return self
        tail = self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {last}; log: {tail}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Fast shutdown by PID (SIGINT: clients are disconnected, everything committed is kept)."""
        self._signal(signal.SIGINT, timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (a crash: it recovers from its WAL at the next start)."""
        self._signal(signal.SIGKILL, 10.0)
        # Its backends exit when they notice the postmaster is gone; the next start waits for them.
        with contextlib.suppress(OSError):
            (self.data / "postmaster.pid").unlink()

    def _signal(self, sig: signal.Signals, timeout_s: float) -> None:
        pid, self.pid = self.pid, None
        if pid is None or not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def create_database(self, name: str | None = None) -> str:
        """CREATE DATABASE (a fresh name unless given); its URL."""
        import psycopg

        name = name or f"db{next(self._dbs)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def throwaway_postgres(base: Path | None = None, database: str = "fleet") -> Iterator[str]:
    """A started throwaway cluster with an empty ``database``; yields its URL, stops it by PID after.

    RuntimeError (with the reason) when PostgreSQL cannot run here. ``base``: where to put the
    cluster's directory when not root (as root it goes to the system temp dir, chowned to postgres).
    """
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(why)
    with PostgresServer(base) as server:
        server.start()
        yield server.create_database(database)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the session (skips the test with the reason when it cannot run)."""
    why = unavailable_reason()
    if why is not None:
        pytest.skip(why)
    with PostgresServer() as server:
        server.start()
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store test writes: an SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return str(request.getfixturevalue("pg_url"))
