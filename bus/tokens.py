"""Credentials of one node or worker each: issue, list, revoke (a config reload), and the file a node joins with.

Per-user permissions in the server config, applied by nats-server's own config reload (SIGHUP):
a reload disconnects every client whose user is gone, and the server refuses it from then on,
while every other connection stays up (docs/security.md says why this and not JWT accounts).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from bus.auth import Issued, issued, save_issued, without_credential
from bus.paths import DEFAULT_NATS, private_dir, read_nats_url, write_private

__all__ = ["Creds", "creds_in", "issue", "read_creds", "reload_server", "revoke", "with_creds"]

ISSUED_ROLES = ("node", "worker")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_FORMAT = "chatbus-credential/1"


@dataclass(frozen=True)
class Creds:
    """What a credential file holds: who (user, password), as what, and where the bus was."""

    name: str
    role: str
    user: str
    password: str
    url: str
    models: list[str] | None = None


def issue(
    state_dir: Path,
    name: str,
    role: str = "node",
    *,
    models: list[str] | None = None,
    adapters: bool = False,
    kinds: list[str] | None = None,
    leaf: bool = False,
    url: str | None = None,
    out: Path | None = None,
) -> tuple[Issued, Path]:
    """A new credential `name` and its file (0600: `out`, else under `<state>/auth/creds/`); the
    server config is rewritten and reloaded, so it works at once."""
    if not _NAME.match(name):
        raise ValueError(f"credential names are 1-63 letters, digits, '-' or '_', got {name!r}")
    if role not in ISSUED_ROLES:
        raise ValueError(f"role must be one of {', '.join(ISSUED_ROLES)}, got {role!r}")
    creds = issued(state_dir)
    if name in creds:
        raise ValueError(f"{name!r} exists already: revoke it first, or pick another name")
    cred = Issued(
        name=name,
        role=role,
        password=secrets.token_urlsafe(24),
        models=sorted(set(models)) if models else None,
        adapters=adapters,
        kinds=sorted(set(kinds)) if kinds else None,
        created=time.time(),
        leaf=leaf and role == "node",
    )
    save_issued(state_dir, {**creds, name: cred})
    reload_server(state_dir)
    bus = without_credential(url or read_nats_url(state_dir) or DEFAULT_NATS)
    file = Creds(name, role, cred.user, cred.password, bus, cred.models)
    path = out or private_dir(state_dir / "auth" / "creds") / f"{role}-{name}.creds"
    write_private(path, json.dumps({"format": _FORMAT, **vars(file)}, indent=1) + "\n")
    return cred, path


def revoke(state_dir: Path, name: str) -> Issued:
    """Drop credential `name` from the server config and reload: its connections are closed and
    it cannot connect again. Raises KeyError if there is none."""
    creds = issued(state_dir)
    cred = creds.pop(name)
    save_issued(state_dir, creds)
    reload_server(state_dir)
    return cred


def read_creds(path: Path) -> Creds:
    """A credential file `issue` wrote (ValueError with what is wrong otherwise)."""
    try:
        raw = json.loads(Path(path).read_text())
        if raw.pop("format", None) != _FORMAT:
            raise ValueError("not a chatbus credential file")
        return Creds(**raw)
    except (OSError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read the credential file {path}: {e}") from e


def with_creds(url: str | None, path: Path) -> str:
    """The URL to join with the credential file at `path`: `url` (else the one in the file) with
    `?creds=` naming it (bus.connection.connect reads it)."""
    base = url or read_creds(path).url
    return f"{base}{'&' if '?' in base else '?'}{urlencode({'creds': str(Path(path).resolve())})}"


def creds_in(url: str) -> Creds | None:
    """The credential file of ours that `url` names with `?creds=`, if any."""
    path = dict(parse_qsl(url.partition("?")[2])).get("creds")
    try:
        return read_creds(Path(path)) if path else None
    except ValueError:
        return None  # a NATS JWT .creds file


def reload_server(state_dir: Path) -> bool:
    """Tell the embedded server of `chatbus up` with this state dir to reload its config (what
    `nats-server --signal reload` does); False when none runs (it reads the config when it starts)."""
    try:
        pid = int((state_dir / "auth" / "nats.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"nats-server" not in cmdline.read_bytes():
            return False  # a stale pid file: that number is someone else's process now
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True
