"""A throw-away PostgreSQL server from the machine's binaries, for ledger and store tests.

:func:`start_postgres` runs ``initdb`` into a temporary folder and ``pg_ctl start`` on 127.0.0.1
and a free port (socket in the same folder); :func:`new_database` creates an empty database on
it and returns its SQLAlchemy URL (``postgresql+psycopg://``). initdb refuses to run as root, so
as root both run as the ``postgres`` user on a folder it owns. The fixtures in ``conftest.py``
(``postgres_server``, ``postgres_url``) start one server per test session and skip, saying why,
only when the binaries or the psycopg driver are absent.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("TAAS_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "taas"


@dataclass
class PostgresServer:
    folder: Path
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        _run(self.folder, [str(PG_BIN / "pg_ctl"), "-D", str(self.folder / "data"), "-m",
                           "fast", "-w", "stop"], check=False)  # fmt: skip
        shutil.rmtree(self.folder, ignore_errors=True)


def missing() -> str | None:
    """Why no server can be started here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found under {PG_BIN} (set TAAS_PG_BIN)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (requirements.in: psycopg[binary])"
    return None


def _run(folder: Path, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:  # initdb and postgres refuse root: run as the folder's owner
        argv = ["su", "postgres", "-s", "/bin/bash", "-c", shlex.join(argv)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=check)


def start_postgres(port: int) -> PostgresServer:
    folder = Path(tempfile.mkdtemp(prefix="taas-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = PostgresServer(folder, port)
    try:
        _run(folder, [str(PG_BIN / "initdb"), "-D", str(folder / "data"), "-A", "trust",
                      "-U", USER, "-E", "UTF8"])  # fmt: skip
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        _run(folder, [str(PG_BIN / "pg_ctl"), "-D", str(folder / "data"), "-o", options,
                      "-l", str(folder / "server.log"), "-w", "start"])  # fmt: skip
    except BaseException:
        server.stop()
        raise
    return server


def new_database(server: PostgresServer) -> str:
    """An empty database on ``server``; returns its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    name = "t_" + uuid.uuid4().hex[:12]
    engine = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return f"postgresql+psycopg://{USER}@127.0.0.1:{server.port}/{name}"
