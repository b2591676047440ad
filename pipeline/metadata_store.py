"""Where a run's ML Metadata lives: the embedded SQLite file (the default)
or a shared MySQL/MariaDB database (`--metadata-mysql
mysql://USER@HOST:PORT/DB`, the password from $DEEPSEEK_TFX_MYSQL_PASSWORD,
never on the command line or in the URL, so it stays out of shell history
and logs). One object, `MetadataTarget`, gives the runner its connection
config and `inspect` / the run report their store, and turns the server's
refusals into one line."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import urllib.parse
from typing import Optional

PASSWORD_ENV = "DEEPSEEK_TFX_MYSQL_PASSWORD"
_SCHEMA_RACE_RETRIES = 10
DEFAULT_MYSQL_PORT = 3306
_DB_NAME = re.compile(r"^[A-Za-z0-9_$]{1,64}$")


class MetadataStoreError(RuntimeError):
    """The store cannot be opened; the message is one line naming why."""


@dataclasses.dataclass(frozen=True)
class MySQLAddress:
    user: str
    database: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_MYSQL_PORT
    unix_socket: Optional[str] = None

    @classmethod
    def parse(cls, url: str) -> "MySQLAddress":
        """mysql://USER@HOST[:PORT]/DB[?unix_socket=/path/to/mysqld.sock];
        a ValueError naming the problem otherwise."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "mysql":
            raise ValueError(f"metadata_mysql: {url!r} is not a mysql://USER@HOST:PORT/DB URL")
        if parts.password is not None:
            raise ValueError(f"metadata_mysql: put the password in ${PASSWORD_ENV}, not in the URL")
        if not parts.username:
            raise ValueError(f"metadata_mysql: {url!r} names no user (mysql://USER@HOST:PORT/DB)")
        database = parts.path.lstrip("/")
        if not _DB_NAME.match(database):
            raise ValueError(f"metadata_mysql: {url!r}: the database name must be 1-64 letters, "
                             f"digits, _ or $, got {database!r}")
        try:
            port = parts.port or DEFAULT_MYSQL_PORT
        except ValueError:
            raise ValueError(f"metadata_mysql: {url!r} has a bad port") from None
        options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(options) - {"unix_socket"})
        if unknown:
            raise ValueError(f"metadata_mysql: unknown option(s) {unknown}; only unix_socket")
        socket = options.get("unix_socket", [None])[-1] or None
        if not parts.hostname and not socket:
            raise ValueError(f"metadata_mysql: {url!r} names no host (or ?unix_socket=PATH)")
        return cls(user=urllib.parse.unquote(parts.username), database=database,
                   host=parts.hostname or "localhost", port=port, unix_socket=socket)

    def url(self) -> str:
        where = f"{self.host}:{self.port}" if not self.unix_socket else self.host
        tail = f"?unix_socket={self.unix_socket}" if self.unix_socket else ""
        return f"mysql://{self.user}@{where}/{self.database}{tail}"


@dataclasses.dataclass(frozen=True)
class MetadataTarget:
    """Exactly one of an SQLite file and a MySQL address."""
    sqlite_path: Optional[str] = None
    mysql: Optional[MySQLAddress] = None

    @classmethod
    def of(cls, sqlite_path: Optional[str] = None, mysql_url: Optional[str] = None) -> "MetadataTarget":
        if mysql_url:
            return cls(mysql=MySQLAddress.parse(mysql_url))
        if not sqlite_path:
            raise ValueError("metadata: neither an SQLite path nor a MySQL URL")
        return cls(sqlite_path=sqlite_path)

    def describe(self) -> str:
        return self.mysql.url() if self.mysql else self.sqlite_path

    def connection_config(self, readonly: bool = False):
        from ml_metadata.proto import metadata_store_pb2

        config = metadata_store_pb2.ConnectionConfig()
        if self.mysql is None:
            config.sqlite.filename_uri = self.sqlite_path
            config.sqlite.connection_mode = (
                metadata_store_pb2.SqliteMetadataSourceConfig.READONLY if readonly else
                metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE)
            return config
        m = self.mysql
        config.mysql.database = m.database
        config.mysql.user = m.user
        config.mysql.password = os.environ.get(PASSWORD_ENV, "")
        if m.unix_socket:
            config.mysql.socket = m.unix_socket
        else:
            config.mysql.host = m.host
            config.mysql.port = m.port
        # A reader never creates the database; a runner creates it on first use.
        config.mysql.skip_db_creation = readonly
        return config

    def open(self, readonly: bool = True):
        """The MetadataStore; MetadataStoreError (one line) when it cannot be opened."""
        from ml_metadata import metadata_store

        if self.mysql is None and not os.path.exists(self.sqlite_path):
            raise FileNotFoundError(f"no ML Metadata store at {self.sqlite_path} (has the pipeline run?)")
        for attempt in range(_SCHEMA_RACE_RETRIES + 1):
            try:
                # MLMD's C++ side logs a multi-line advice to fd 2 on every
                # failed MySQL connect; our one line replaces it.
                with _quiet_stderr():
                    return metadata_store.MetadataStore(self.connection_config(readonly))
            except Exception as e:  # noqa: BLE001 - MLMD raises its own error types per status code
                # Two runs opening a new database at once: one creates the
                # schema, the other is told to retry (MLMD's own advice).
                if "concurrent connection" in str(e) and attempt < _SCHEMA_RACE_RETRIES:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise MetadataStoreError(self.explain(e)) from None

    def check(self) -> None:
        """For MySQL: opens (creating the database and schema when missing)
        and closes the store, so a bad address fails before any component
        runs. The SQLite file is the runner's to create, in its run directory."""
        if self.mysql is not None:
            self.open(readonly=False)

    def explain(self, error: BaseException) -> str:
        """One line for a failure to open, naming the cause: unreachable,
        wrong password, missing permission or database."""
        text = " ".join(str(error).split())
        where = self.describe()
        if self.mysql is None:
            return f"ML Metadata at {where}: {text}"
        m = self.mysql
        grant = f"GRANT ALL ON {m.database}.* TO the user"
        unreachable = _unreachable(m)
        if unreachable:
            reason = f"cannot reach the server ({unreachable})"
        elif "Access denied for user" in text and "to database" in text:
            reason = f"user {m.user!r} has no permission to create or use database {m.database!r} ({grant})"
        elif "command denied" in text:
            reason = f"user {m.user!r} lacks a permission on database {m.database!r} ({grant})"
        elif "Unknown database" in text:
            reason = f"database {m.database!r} does not exist (a run creates it)"
        elif "mysql_real_connect failed" in text:
            # MLMD's client drops the server's errno here; the server answered,
            # so the login itself was refused.
            reason = (f"the server refused the login of {m.user!r}: wrong password (${PASSWORD_ENV}), "
                      f"unknown user, or an account not on mysql_native_password")
        else:
            reason = f"cannot open the store ({text[:300]})"
        return f"ML Metadata at {where}: {reason}"


def _unreachable(m: MySQLAddress) -> Optional[str]:
    """Why nothing answers at the address, or None when something does."""
    import socket

    try:
        if m.unix_socket:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(m.unix_socket)
        else:
            socket.create_connection((m.host, m.port), timeout=5).close()
    except OSError as e:
        where = m.unix_socket or f"{m.host}:{m.port}"
        return f"{where}: {e.strerror or e}"
    return None


class _quiet_stderr:
    """Redirects file descriptor 2 to a temporary file for the block; what
    was written there is replayed when the block succeeds and dropped when
    it raises (the caller's one line replaces it)."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, exc_type, *_):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        with self.file:
            self.file.seek(0)
            data = self.file.read()
        if data and exc_type is None:
            os.write(2, data)
        return False


_PASSWORD_FIELD = re.compile(r'(password\s*:\s*)"(?:[^"\\]|\\.)*"')


def redact(text: str) -> str:
    """`password: "..."` (a ConnectionConfig in text format) -> `password: "***"`."""
    return _PASSWORD_FIELD.sub(r'\1"***"', text)


class _RedactPasswords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "password" in message:
            record.msg, record.args = redact(message), None
        return True


def redact_passwords_in_logs() -> None:
    """TFX logs the pipeline IR and the ML Metadata connection config at
    INFO, the MySQL password included; this filter on absl's logger (the one
    TFX writes to) masks it before any handler sees it. Idempotent."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _RedactPasswords) for f in logger.filters):
        logger.addFilter(_RedactPasswords())


def target_of(settings) -> MetadataTarget:
    """The store a PipelineSettings names."""
    return MetadataTarget.of(settings.path("metadata"), settings.metadata_mysql)


def as_target(store) -> MetadataTarget:
    """A MetadataTarget from a target or an SQLite path (the older callers)."""
    return store if isinstance(store, MetadataTarget) else MetadataTarget.of(sqlite_path=store)
