"""A throwaway MariaDB server for the ML Metadata on MySQL tests: a fresh
data directory (mariadb-install-db), `mariadbd` on 127.0.0.1 at a free port
and on a unix socket in that directory, stopped and removed afterwards.
The binaries come from scripts/ensure_mariadb.sh (run by scripts/run_tests.sh)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

from training.launch import _tie_to_parent


def available() -> bool:
    return all(shutil.which(b) for b in ("mariadbd", "mariadb-install-db", "mariadb"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MariaDB:
    def __init__(self, base: Optional[str] = None):
        self.base = tempfile.mkdtemp(prefix="deepseek-tfx-mariadb-", dir=base)
        self.datadir = os.path.join(self.base, "data")
        self.socket = os.path.join(self.base, "mysqld.sock")
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "MariaDB":
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
                        "--auth-root-authentication-method=socket", "--skip-test-db", *user],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", *user,
             "--bind-address=127.0.0.1", f"--port={self.port}", f"--socket={self.socket}",
             f"--pid-file={os.path.join(self.base, 'mysqld.pid')}",
             f"--log-error={os.path.join(self.base, 'error.log')}",
             "--skip-log-bin", "--innodb-buffer-pool-size=64M", "--max-connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=_tie_to_parent(os.getpid()))  # a killed test run leaves no server behind
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}; see "
                                   f"{os.path.join(self.base, 'error.log')}")
            if os.path.exists(self.socket) and self.sql("SELECT 1", check=False).returncode == 0:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"mariadbd did not come up in {timeout:.0f} s")

    def sql(self, statements: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs SQL as root over the socket (root authenticates by socket)."""
        return subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot",
                               "-N", "-B", "-e", statements],
                              check=check, capture_output=True, text=True)

    def add_user(self, user: str, password: str, grant: Optional[str] = "ALL PRIVILEGES ON *.*") -> None:
        """The user at 127.0.0.1 (TCP) and localhost (socket), with
        mysql_native_password (what MLMD's bundled client speaks)."""
        for host in ("127.0.0.1", "localhost"):
            self.sql(f"CREATE USER '{user}'@'{host}' IDENTIFIED VIA mysql_native_password "
                     f"USING PASSWORD('{password}');"
                     + (f"GRANT {grant} TO '{user}'@'{host}';" if grant else ""))

    def url(self, user: str, database: str, via_socket: bool = False) -> str:
        if via_socket:
            return f"mysql://{user}@localhost/{database}?unix_socket={self.socket}"
        return f"mysql://{user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)
