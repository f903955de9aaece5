"""A throwaway PostgreSQL cluster from the binaries on the machine (``initdb`` + ``pg_ctl``), in a
directory of its own on a free port, with trust authentication on 127.0.0.1 and its socket in that
directory: what the scale-out tests and ``python -m benchmarks.scale`` run MLflow and Optuna on.
PostgreSQL refuses to run as root, so under root the cluster belongs to the ``postgres`` system user
(or ``nobody``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

from mlops import services

PG_BINARIES = ("initdb", "pg_ctl")


def pg_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if all((candidate / name).is_file() for name in PG_BINARIES):
            return candidate
    return None


def _cluster_user() -> str | None:
    """The unprivileged account that runs the cluster when this process runs as root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a postgres nor a nobody account exists for PostgreSQL")


class PostgresCluster:
    """A throwaway PostgreSQL cluster: ``start()``, ``create_database()``, ``url()``, ``stop()``."""

    superuser = "mlops"

    def __init__(self, bin_dir: Path, root: Path, port: int | None = None, fsync: bool = False) -> None:
        """``fsync=False`` (tests: the cluster is thrown away) runs the server with ``-F``; a
        benchmark that compares stores keeps fsync on, as a real server has it."""
        self.bin_dir = bin_dir
        self.fsync = fsync
        self.root = root
        self.data = root / "data"
        self.port = port or services.free_port()
        self.user = _cluster_user()

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              user=self.user, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def start(self) -> PostgresCluster:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", self.superuser, "--auth=trust", "-E", "UTF8", "--no-sync")
        # the socket stays in the cluster's directory
        options = f"-k {self.root} -h 127.0.0.1 -p {self.port}" + ("" if self.fsync else " -F")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60",
                  "-o", options, "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        """``postgresql://mlops@127.0.0.1:PORT/database`` (the form users write; no password: trust)."""
        return f"{scheme}://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres", params: tuple = ()) -> list[tuple]:
        """Runs one statement in autocommit mode; returns its rows (empty for statements without any)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as connection:
            cursor = connection.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, prefix: str = "db", template: str | None = None) -> str:
        """A new database with a unique name, empty or a copy of the database named ``template``
        (which nothing may be connected to); returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)
