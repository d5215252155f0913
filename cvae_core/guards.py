"""Guards for input that reaches files, logs and network calls (standard library only).

* :func:`redact` hides the password of any ``scheme://user:password@host`` in a text; every
  line, file or record that may carry a tracking or database URI goes through it.
* :func:`check_name` keeps a user-chosen name (study, experiment, folder) to one harmless path
  component, so that ``root / name`` can never leave ``root``.
* :func:`check_tracking_server` asks an http(s) MLflow server's ``/health`` with a short
  timeout, so an unreachable server is reported in seconds, not after minutes of client retries,
  then makes one authenticated call with the credentials MLflow's client will use, so refused or
  missing credentials are one line before anything starts.
* :func:`adopt_tracking_credentials` moves a URI's ``user:password@`` into MLflow's own client
  variables, so only the bare URI travels on.
* :func:`check_sqlite_uri` refuses a ``sqlite:///`` URI whose folder does not exist, instead of
  letting a typo silently create a new, empty store somewhere else.
* :func:`check_writable` refuses, before any work starts, an output path that cannot be written.
* :func:`decode_text` turns the bytes of a file the user gave into text, or names the file and
  the line that is not text (undecodable, or a NUL byte of a binary file).
"""
from __future__ import annotations

import base64
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import CvaeError

_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<password>[^/\s@]+)@")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MAX_NAME_CHARS = 128
HEALTH_TIMEOUT_S = 5.0


def redact(text: str) -> str:
    """``http://user:secret@host`` -> ``http://user:***@host`` anywhere in ``text``."""
    return _CREDENTIALS.sub(r"\g<head>:***@", text)


def check_name(name: str, what: str) -> str:
    """A name that becomes a file or folder name: letters, digits, ``._+-``; no separator, no
    leading dot, at most MAX_NAME_CHARS characters."""
    if not isinstance(name, str) or not name.strip():
        raise CvaeError(f"{what} is empty; give a name such as lambda-2026")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise CvaeError(f"{what} {name!r} is not allowed: use letters, digits and . _ + - only (no '/', no "
                        f"leading dot, at most {MAX_NAME_CHARS} characters), so it stays inside its folder")
    return name


def split_credentials(uri: str) -> tuple[str, str | None]:
    """-> (the URI without ``user:password@``, the ``Authorization`` header value or None)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri, None
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return (urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
            "Basic " + base64.b64encode(token.encode()).decode())


def _client_authorization(uri: str) -> tuple[str | None, str]:
    """The ``Authorization`` header MLflow's client sends to ``uri`` (None: no credentials), and
    whose it is, for messages.  Credentials in the URI win; else MLflow's own order:
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (each falling back to
    ``~/.mlflow/credentials``) when both are set, else MLFLOW_TRACKING_TOKEN."""
    import configparser

    authorization = split_credentials(uri)[1]
    if authorization is not None:
        username = urllib.parse.unquote(urllib.parse.urlsplit(uri).username or "")
        return authorization, f"user {username!r} (from the URI)"
    saved = configparser.ConfigParser()
    saved.read(Path("~/.mlflow/credentials").expanduser())
    username, password = (os.environ.get(name) or saved.get("mlflow", name.lower(), fallback=None)
                          for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    if username and password:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        source = "MLFLOW_TRACKING_USERNAME/PASSWORD" + (
            "" if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")
            else " with ~/.mlflow/credentials")
        return "Basic " + token, f"user {username!r} (from {source})"
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"], "the token in MLFLOW_TRACKING_TOKEN"
    return None, ""


def _ask(url: str, authorization: str | None, timeout_s: float) -> int | str:
    """GET ``url`` -> its HTTP status, or why no answer came (a short text)."""
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc)) or type(exc).__name__


def check_tracking_server(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Raise CvaeError naming the (redacted) URI unless an http(s) server answers ``/health``
    and accepts the credentials MLflow's client will send (one cheap experiments search: an
    auth-enabled server answers 401 to missing or wrong ones).  Other schemes are not servers
    and pass."""
    if not uri.startswith(("http://", "https://")):
        return
    bare = split_credentials(uri)[0].rstrip("/")
    health = _ask(bare + "/health", None, timeout_s)  # needs no login: tells "down" from "refused"
    if health != 200:
        reason = f"HTTP {health}" if isinstance(health, int) else health
        raise CvaeError(f"MLflow tracking server {redact(uri)} is not reachable within {timeout_s:g} s ({reason}); "
                        "start it (python mlflow/server.py) or fix --tracking-uri / MLFLOW_TRACKING_URI")
    authorization, who = _client_authorization(uri)
    status = _ask(bare + "/api/2.0/mlflow/experiments/search?max_results=1", authorization, timeout_s)
    if status == 200:
        return
    if status == 401:
        given = (f"the credentials of {who} (HTTP 401)" if authorization
                 else "a request without credentials (HTTP 401: it needs a login)")
        raise CvaeError(f"MLflow tracking server {redact(uri)} refused {given}; set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server")
    if status == 403:
        raise CvaeError(f"MLflow tracking server {redact(uri)} denies {who or 'anonymous requests'} access "
                        "(HTTP 403); ask its admin for permissions or use another account")
    reason = f"HTTP {status}" if isinstance(status, int) else status
    raise CvaeError(f"MLflow tracking server {redact(uri)} answers /health but not its REST API ({reason}); "
                    "check --tracking-uri / MLFLOW_TRACKING_URI")


def check_sqlite_uri(uri: str, must_exist: bool = False) -> Path | None:
    """For ``sqlite:////abs/file.db``: the folder must exist, and the file, if there (or when
    ``must_exist``), must be an MLflow store, never another database MLflow would add its
    tables to. -> the file (None for other schemes)."""
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path.parent.is_dir():
        raise CvaeError(f"tracking URI {redact(uri)}: folder {path.parent} does not exist (a typo?); create it "
                        "first or fix the path")
    if not path.exists():
        if must_exist:
            raise CvaeError(f"no MLflow store at {path} (tracking URI {redact(uri)}); pass --tracking-uri or set "
                            "MLFLOW_TRACKING_URI")
        return path
    if not path.is_file():
        raise CvaeError(f"tracking URI {redact(uri)}: {path} is not a file")
    if path.stat().st_size == 0 and not must_exist:
        return path
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
        if header != b"SQLite format 3\x00":
            raise sqlite3.DatabaseError("not an SQLite file")
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in connection.execute("select name from sqlite_master where type='table'")}
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise CvaeError(f"{path} is not an MLflow store ({exc})") from None
    if (tables or must_exist) and not {"experiments", "runs", "alembic_version"} <= tables:
        raise CvaeError(f"{path} is not an MLflow store (an SQLite file without MLflow's tables); "
                        "check --tracking-uri")
    return path


def adopt_tracking_credentials(uri: str, environ=None) -> str:
    """Move ``user:password@`` out of an http(s) tracking URI into MLflow's client variables
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this process, inherited by the Ray
    workers it starts) and return the bare URI, which is then the only form ever printed, saved
    in study.json or summaries, tagged, or pickled by Ray.  Such a URI still works, with a
    one-line note on stderr recommending the variables: a password on a command line is in the
    process list (``ps``, ``/proc/PID/cmdline``) for every local user while the command runs."""
    import sys

    environ = os.environ if environ is None else environ
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    bare = split_credentials(uri)[0]
    print(f"note: the tracking URI carries a password, which every local user can read in the process list while "
          f"it is on a command line; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead and give "
          f"the URI as {bare}", file=sys.stderr, flush=True)
    environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    return bare


def check_writable(path: str | Path, what: str, folder: bool = True) -> Path:
    """Refuse an output path (a folder when ``folder``, else a file) that cannot be written, before
    any work starts: it must not be a file where a folder is wanted (or the reverse), and the
    nearest folder that exists at or above it must take new entries (probed with a temporary
    folder that is removed at once: access bits say nothing for root or a read-only mount).
    -> the path, absolute.  Nothing is created."""
    path = Path(path).expanduser().absolute()
    if folder and path.exists() and not path.is_dir():
        raise CvaeError(f"{what} {path} is an existing file; give a folder")
    if not folder and path.is_dir():
        raise CvaeError(f"{what} {path} is a folder; give a file name")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CvaeError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=parent))
    except OSError as exc:
        raise CvaeError(f"{what} {path} cannot be written: nothing can be created in {parent} "
                        f"({exc.strerror or exc})") from None
    return path


def decode_text(raw: bytes, path: str | Path) -> str:
    """The UTF-8 text of file ``path`` (its bytes ``raw``); a CvaeError naming the file and the
    first line that is not text: undecodable bytes, or a NUL byte (a binary file decodes as
    UTF-8 when it happens to be all NULs and ASCII, and would then be read as words)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CvaeError(f"{path}: line {line} is not valid UTF-8 (byte {raw[exc.start]:#x})") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise CvaeError(f"{path}: line {text.count(chr(10), 0, nul) + 1} holds a NUL byte: a binary file, "
                        "not text")
    return text
