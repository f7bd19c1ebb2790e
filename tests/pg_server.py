"""A throwaway PostgreSQL server for the tests and the soak benchmark: the distribution's binaries, a
temporary data directory, listening on 127.0.0.1 only (trust authentication: nothing else can reach it).

``AUTOCOMPRESS_TEST_POSTGRES_URL`` (set by ``.ci/run``) names a running server the tests may use as it
is; ``AUTOCOMPRESS_TEST_POSTGRES_BIN`` the folder of ``initdb`` / ``pg_ctl`` (else they are looked for
on ``PATH`` and under ``/usr/lib/postgresql/*/bin``). As root the server runs as user ``postgres``
(``initdb`` refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

URL_ENV = "AUTOCOMPRESS_TEST_POSTGRES_URL"
BIN_ENV = "AUTOCOMPRESS_TEST_POSTGRES_BIN"


def find_bindir() -> tuple[Path | None, str]:
    """(folder holding initdb and pg_ctl, or None; why not found)."""
    candidates = []
    if os.environ.get(BIN_ENV):
        candidates.append(Path(os.environ[BIN_ENV]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d, ""
    return None, "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server process: :meth:`start`, :meth:`stop`, :meth:`restart`, :meth:`new_database`."""

    def __init__(self, bindir: Path, port: int | None = None):
        self.bindir, self.port = bindir, port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ac-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self._user = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError(
                    "running as root and there is no 'postgres' user to run the server"
                ) from exc
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            os.chmod(self.root, 0o755)

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, cwd=self.root, **kwargs
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
        opts += " -c fsync=off -c max_connections=200"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-o", opts, "-w",
            "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A fresh, empty database on the server of ``server_url``; returns its URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(server_url)
    name = f"ac_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database or "postgres"
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return u.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)


def start_server() -> PostgresServer:
    """Init and start a throwaway server (RuntimeError saying why when it cannot)."""
    bindir, why = find_bindir()
    if bindir is None:
        raise RuntimeError(why)
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server
