#!/usr/bin/env python
"""Launch the MLflow tracking server for a study cluster, with safe defaults.

Run it as a file (``python mlflow/server.py``), never as a module: this folder has no
``__init__.py`` on purpose, so it can never shadow the ``mlflow`` library on ``sys.path``.

What it does: reads its settings from flags or ``CVAE_MLFLOW_*`` environment variables,
refuses unsafe or ambiguous ones with a one-line error (exit code 2), then replaces itself
(``exec``) with::

    python -m mlflow server --backend-store-uri URI --serve-artifacts
        --artifacts-destination DEST --host HOST --port PORT
        --allowed-hosts H1,H1:PORT,... --workers N

so the launcher's pid *is* the server's pid and signals reach the server directly.

Settings (flag > environment variable > default):

  --backend-store-uri   CVAE_MLFLOW_BACKEND_URI  required. postgresql+psycopg://... (several
                        writers), or sqlite:////abs/path/mlflow.db (one server on one host).
  --artifacts-destination CVAE_MLFLOW_ARTIFACTS_DESTINATION required. s3://bucket/prefix or a
                        local directory; artifacts are proxied through the server.
  --host                CVAE_MLFLOW_HOST         127.0.0.1. An IP address to bind. 0.0.0.0, ::
                        and public addresses need --allowed-hosts set explicitly.
  --port                CVAE_MLFLOW_PORT         5000
  --allowed-hosts       CVAE_MLFLOW_ALLOWED_HOSTS Host headers to accept, comma-separated. A name
                        without a port is also allowed as name:PORT. Default: the bind address
                        plus localhost/127.0.0.1, each with and without the port.
  --workers             CVAE_MLFLOW_WORKERS      2 (uvicorn worker processes)
  --auth-file           CVAE_MLFLOW_AUTH_FILE    turn on MLflow's basic-auth app. The file holds one
                        line ``username:password`` (the admin; password >= 12 characters), is
                        owned by this user and readable by nobody else (mode 0600), and is never
                        echoed: the credentials reach MLflow through an owner-only auth config
                        written beside it (``<file>.ini``, users and password hashes in
                        ``<file>.db``; both mode 0600), never through the command line. Clients
                        set MLFLOW_TRACKING_USERNAME/PASSWORD (never user:password in the URI).
                        Without it, a bind that is not loopback prints a warning.
  --pidfile PATH        write the server pid there; a server still running under the pid in an
                        existing pidfile is stopped first (so re-running `ray up` restarts it).
  --stop                only stop the server recorded in --pidfile (if running) and exit 0.
  --dry-run             print the mlflow command line and exit 0.

A port that is already in use on the bind address (e.g. a server started earlier and not
recorded in --pidfile) is a one-line error, exit 2, before anything starts.

MLflow's background job runner (GenAI scorer jobs, ~7 extra huey processes) is switched off
(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false) unless that variable is already set.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import re
import secrets
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

# The project's guards load without torch (cvae_core/__init__.py loads its names lazily).
from cvae_core.guards import redact

PROG = "mlflow/server.py"
EXIT_BAD_INPUT = 2

# SQLAlchemy dialects MLflow supports as a tracking backend.
SQL_DIALECTS = ("postgresql", "mysql", "mssql", "sqlite")
# Artifact destinations MLflow resolves itself; anything else without a scheme is a local path.
REMOTE_ARTIFACT_SCHEMES = ("s3", "gs", "wasbs", "abfss", "hdfs", "viewfs", "ftp", "sftp", "oss", "dbfs")


class BadInput(Exception):
    """A setting the user gave (or forgot) that we refuse; the message is printed as one line."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block
        fail(f"{message} (see --help)")


def fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _setting(cli_value, flag: str, env_name: str, default=None):
    """Return (value, where it came from); where is None for the built-in default."""
    if cli_value is not None:
        return cli_value, flag
    env_value = os.environ.get(env_name, "").strip()
    if env_value:
        return env_value, env_name
    return default, None


def check_backend_uri(uri: str | None) -> str:
    if not uri:
        raise BadInput(
            "no backend store: set CVAE_MLFLOW_BACKEND_URI (e.g. postgresql+psycopg://ray@/mlflow?host=/var/run/postgresql, "
            "or sqlite:////abs/path/mlflow.db for a single host) or pass --backend-store-uri"
        )
    if "://" not in uri:
        raise BadInput(f"backend store {uri!r} is not a database URI; use postgresql://... or sqlite:////abs/path/mlflow.db")
    scheme = uri.split("://", 1)[0].lower()
    dialect = scheme.split("+", 1)[0]
    if dialect == "postgres":
        raise BadInput(f"backend store scheme {scheme!r} is not understood by SQLAlchemy; write postgresql://")
    if dialect == "file":
        raise BadInput("file:// backend stores are in maintenance mode in MLflow 3; use postgresql:// or sqlite:////abs/path/mlflow.db")
    if dialect not in SQL_DIALECTS:
        raise BadInput(f"backend store scheme {scheme!r} is not supported; use one of {', '.join(SQL_DIALECTS)}")
    if dialect == "sqlite":
        path = uri.split("://", 1)[1]
        # sqlite:////abs/file.db -> path '/abs/file.db' after the third slash
        if not path.startswith("//"):
            raise BadInput(f"sqlite backend {uri!r} needs an absolute path: sqlite:////abs/path/mlflow.db")
        db_file = Path(path[1:].split("?", 1)[0])
        if not db_file.parent.is_dir():
            raise BadInput(f"sqlite backend directory {str(db_file.parent)!r} does not exist")
    return uri


def check_artifacts_destination(dest: str | None) -> str:
    if not dest:
        raise BadInput(
            "no artifacts destination: set CVAE_MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix or a local "
            "directory) or pass --artifacts-destination; without it MLflow writes ./mlartifacts relative to the cwd"
        )
    if "://" in dest:
        scheme = dest.split("://", 1)[0].lower()
        if scheme == "file":
            dest = dest.split("://", 1)[1]
        elif scheme in REMOTE_ARTIFACT_SCHEMES:
            return dest
        else:
            raise BadInput(f"artifacts destination scheme {scheme!r} is not supported; use s3://... or a local directory")
    local = Path(dest).expanduser().resolve()
    if local.exists() and not local.is_dir():
        raise BadInput(f"artifacts destination {str(local)!r} exists and is not a directory")
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def check_host(host: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise BadInput(f"--host {host!r} is not an IP address; give the address to bind, e.g. 127.0.0.1 or the node's private IP") from None
    return str(address), address


def _with_port(entry: str, port: int) -> list[str]:
    """'10.0.0.5' -> ['10.0.0.5', '10.0.0.5:5000']; entries with a port or a wildcard stay as they are."""
    if "*" in entry:
        return [entry]
    if entry.startswith("["):  # [::1] or [::1]:5000
        return [entry] if "]:" in entry else [entry, f"{entry}:{port}"]
    if entry.count(":") == 1:  # host:port
        return [entry]
    if entry.count(":") > 1:  # bare IPv6 literal: Host headers carry it in brackets
        return [f"[{entry}]", f"[{entry}]:{port}"]
    return [entry, f"{entry}:{port}"]


def allowed_hosts_list(explicit: str | None, address, port: int) -> list[str]:
    if explicit is not None:
        entries = [e.strip() for e in explicit.split(",") if e.strip()]
        if not entries:
            raise BadInput("--allowed-hosts is empty; list the host names/IPs clients use")
        if "*" in entries:
            raise BadInput("--allowed-hosts '*' turns off the Host-header check; list the host names/IPs clients use")
    else:
        bind = f"[{address}]" if address.version == 6 else str(address)
        entries = [bind, "localhost", "127.0.0.1"]
    result: list[str] = []
    for entry in entries:
        for form in _with_port(entry, port):
            if form not in result:
                result.append(form)
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineParser(
        prog=PROG,
        description="Start `mlflow server` (PostgreSQL/SQLite backend, proxied artifacts, explicit bind and allowed hosts).",
        epilog="Each flag falls back to the CVAE_MLFLOW_* environment variable named in mlflow/README.md.",
    )
    parser.add_argument("--backend-store-uri")
    parser.add_argument("--artifacts-destination")
    parser.add_argument("--host")
    parser.add_argument("--port")
    parser.add_argument("--allowed-hosts")
    parser.add_argument("--auth-file")
    parser.add_argument("--workers")
    parser.add_argument("--pidfile")
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv)


MIN_PASSWORD_CHARS = 12


def read_auth_file(path: Path) -> tuple[str, str]:
    """-> (username, password) from an owner-only ``username:password`` file."""
    try:
        info = path.stat()
    except OSError:
        raise BadInput(f"auth file {path} does not exist; create it with: umask 077; "
                       f"printf '%s:%s\\n' admin \"$(openssl rand -hex 16)\" > {path}") from None
    if not path.is_file():
        raise BadInput(f"auth file {path} is not a regular file")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise BadInput(f"auth file {path} must be owned by this user and private (mode {info.st_mode & 0o777:o} "
                       f"found; run: chmod 600 {path})")
    line = path.read_text(encoding="utf-8").strip()
    username, sep, password = line.partition(":")
    if not sep or not username or "\n" in line:
        raise BadInput(f"auth file {path} must hold one line username:password")
    if len(password) < MIN_PASSWORD_CHARS:
        raise BadInput(f"auth file {path}: the password must have at least {MIN_PASSWORD_CHARS} characters")
    return username, password


def open_private(path: Path, truncate: bool) -> int:
    """-> a write descriptor of ``path``, created or already made owner-only (mode 0600) before
    a byte is written, whatever the umask or the mode of an older file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o600)
        os.fchmod(fd, 0o600)
    except OSError as error:
        raise BadInput(f"cannot make {path} private to this user ({error.strerror})") from None
    return fd


def write_auth_config(auth_file: Path) -> Path:
    """The basic-auth app's config (admin credentials, users DB, no access by default), owner-only.

    MLflow opens the users DB through SQLAlchemy/sqlite3, which would create it with the umask's
    mode (0644 for most users): readable password hashes. It is created here first, empty (SQLite
    takes an empty file for a new database) and 0600, and an existing one is made 0600; SQLite
    gives its journal files the database's mode."""
    username, password = read_auth_file(auth_file)
    ini = auth_file.with_name(auth_file.name + ".ini")
    users_db = auth_file.resolve().with_name(auth_file.name + ".db")
    text = ("[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{users_db}\n"
            f"admin_username = {username}\n"
            f"admin_password = {password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    os.close(open_private(users_db, truncate=False))
    with os.fdopen(open_private(ini, truncate=True), "w") as handle:
        handle.write(text)
    return ini


def _positive_int(value: str, source: str, upper: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"{source}={value!r} is not an integer") from None
    if number < 1 or (upper is not None and number > upper):
        bounds = f"1..{upper}" if upper else ">= 1"
        raise BadInput(f"{source}={number} is out of range ({bounds})")
    return number


def build_command(args: argparse.Namespace) -> list[str]:
    backend, _ = _setting(args.backend_store_uri, "--backend-store-uri", "CVAE_MLFLOW_BACKEND_URI")
    backend = check_backend_uri(backend)

    dest, _ = _setting(args.artifacts_destination, "--artifacts-destination", "CVAE_MLFLOW_ARTIFACTS_DESTINATION")

    port_value, port_source = _setting(args.port, "--port", "CVAE_MLFLOW_PORT", "5000")
    port = _positive_int(port_value, port_source or "--port", upper=65535)

    workers_value, workers_source = _setting(args.workers, "--workers", "CVAE_MLFLOW_WORKERS", "2")
    workers = _positive_int(workers_value, workers_source or "--workers")

    host_value, _ = _setting(args.host, "--host", "CVAE_MLFLOW_HOST", "127.0.0.1")
    host, address = check_host(host_value)

    explicit_hosts, _ = _setting(args.allowed_hosts, "--allowed-hosts", "CVAE_MLFLOW_ALLOWED_HOSTS")
    exposed = address.is_unspecified or not (address.is_private or address.is_loopback)
    if exposed and explicit_hosts is None:
        kind = "every interface" if address.is_unspecified else "a public address"
        raise BadInput(
            f"refusing to bind {host} ({kind}) without an explicit --allowed-hosts / CVAE_MLFLOW_ALLOWED_HOSTS; "
            "bind a private IP instead or list the host names clients use"
        )
    allowed = allowed_hosts_list(explicit_hosts, address, port)

    auth_value, _ = _setting(args.auth_file, "--auth-file", "CVAE_MLFLOW_AUTH_FILE")
    if auth_value:
        read_auth_file(Path(auth_value).expanduser())  # refuse a bad or readable file before starting
    elif not address.is_loopback:
        print(f"{PROG}: warning: serving {host} without authentication: anyone who reaches it can read, change "
              "or delete runs; pass --auth-file (see mlflow/README.md)", file=sys.stderr)
    auth = ["--app-name", "basic-auth"] if auth_value else []

    # Validate the destination last: for a local directory it creates the folder.
    dest = check_artifacts_destination(dest)

    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--serve-artifacts",
        "--artifacts-destination", dest,
        "--host", host,
        "--port", str(port),
        "--allowed-hosts", ",".join(allowed),
        "--workers", str(workers),
        *auth,
    ]


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` the way uvicorn will (SO_REUSEADDR, so a closed connection's TIME_WAIT
    is no conflict, but a listening server is), then let it go.  Without this, a second server
    on a busy port logs one uvicorn line and exits 0, which looks like success."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise BadInput(f"port {port} on {host} is already in use (another MLflow server? stop it with "
                               f"{PROG} --pidfile PATH --stop, or choose another --port / CVAE_MLFLOW_PORT)") from None
            raise BadInput(f"cannot bind {host}:{port} ({error.strerror}); --host must be an address of this "
                           "machine") from None


def _running_mlflow(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"mlflow" in cmdline


def replace_previous(pidfile: Path) -> None:
    """Stop the server recorded in pidfile (its whole process group), if it is still an mlflow process."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if pid == os.getpid() or not _running_mlflow(pid):
        return
    print(f"{PROG}: stopping the server in process group {pid}", file=sys.stderr)
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _running_mlflow(pid):
                return
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.stop:
        if not args.pidfile:
            fail("--stop needs --pidfile (the file the running server was started with)")
        replace_previous(Path(args.pidfile).expanduser())
        return
    try:
        command = build_command(args)
    except BadInput as error:
        fail(str(error))

    printable = shlex.join(redact(part) for part in command)
    if args.dry_run:
        print(printable)
        return

    pidfile = Path(args.pidfile).expanduser() if args.pidfile else None
    if pidfile:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        replace_previous(pidfile)  # first: its port is the one to take over
    try:
        check_port_free(command[command.index("--host") + 1], int(command[command.index("--port") + 1]))
    except BadInput as error:
        fail(str(error))
    if pidfile:
        # Lead our own process group so `kill -- -PID` (or os.killpg) stops the uvicorn workers
        # too. setsid fails when we already lead a group (a background job in an interactive
        # shell); then the pgid equals our pid anyway.
        try:
            os.setsid()
        except PermissionError:
            pass
        pidfile.write_text(f"{os.getpid()}\n")

    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if "basic-auth" in command:
        auth_file, _ = _setting(args.auth_file, "--auth-file", "CVAE_MLFLOW_AUTH_FILE")
        try:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(Path(auth_file).expanduser()))
        except BadInput as error:
            fail(str(error))
        # the auth app's CSRF protection needs one key shared by the workers (they inherit it)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    print(f"{PROG}: exec {printable}", file=sys.stderr, flush=True)
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
