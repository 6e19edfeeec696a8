"""Who may do what on the bus: one credential per role, the server config that enforces it, and URLs.

`chatbus up` provisions a password per role once (kept private in the state dir) and writes the
embedded server's config from them. Each process gets its role's credential inside its NATS URL
(`nats://node:SECRET@host:port`, handed over in the environment, never on a command line), so no
flag had to be plumbed through every package; `redact()` keeps secrets out of every message.

Roles: a **node** serves models (answers requests, publishes tokens and heartbeats); a **gateway**
asks nodes; a **ui** (web app, terminal chat, CLI) asks nodes, submits jobs and writes chat logs; a
**worker** (trainer, judge) consumes jobs and asks nodes; **admin** may do anything (operators'
tools). What each may not do is what the tests check: only nodes publish tokens and heartbeats, only
nodes take requests, only workers consume or acknowledge jobs, nobody reads another role's replies
(each role has its own inbox prefix), and nobody but admin deletes or purges a record stream.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from bus import subjects
from bus.paths import private_dir, read_nats_url, write_private

__all__ = [
    "ROLES",
    "Provisioned",
    "credential_of",
    "local_url",
    "permissions",
    "provision",
    "redact",
    "with_credential",
]

ROLES = ("node", "gateway", "ui", "worker", "admin")

_RECORDS = (  # streams that are somebody's record: jobs, their events and results, chat and vote logs
    subjects.JOBS_STREAM,
    subjects.JOB_EVENTS_STREAM,
    subjects.LOGS_STREAM,
    f"KV_{subjects.JOBS_BUCKET}",
    f"KV_{subjects.EVAL_TRIGGERS_BUCKET}",
    f"OBJ_{subjects.ARTIFACTS_BUCKET}",
)

_ASK = [subjects.gen_all(), subjects.ctl_all(), subjects.embed_all(), subjects.count_all()]

# The streams each asking role works with (beside the token stream): all it may do in JetStream.
_NODES_KV = f"KV_{subjects.NODES_BUCKET}"
_RESUME_KV = f"KV_{subjects.RESUME_BUCKET}"
_JOB_STREAMS = (
    subjects.JOBS_STREAM,
    subjects.JOB_EVENTS_STREAM,
    f"KV_{subjects.JOBS_BUCKET}",
    f"OBJ_{subjects.ARTIFACTS_BUCKET}",
    f"KV_{subjects.EVAL_TRIGGERS_BUCKET}",
)
# Operators' buckets (bus/operations.py): nodes put metrics; gateways read keys, count limits and usage.
_OPS_KV = tuple(
    f"KV_{b}"
    for b in (subjects.METRICS_BUCKET, subjects.KEYS_BUCKET, subjects.LIMITS_BUCKET, subjects.USAGE_BUCKET)
)
_STREAMS = {
    "gateway": (_NODES_KV, _RESUME_KV, *_OPS_KV),
    "ui": (_NODES_KV, *_JOB_STREAMS, subjects.LOGS_STREAM, _OPS_KV[0]),
    "worker": (_NODES_KV, *_JOB_STREAMS),
}


def _jetstream(role: str) -> list[str]:
    """The JetStream API calls an asking role may make: create, inspect and read its own streams
    (never update, delete or purge one, which could source or republish another stream into it),
    and on the token stream only consumers filtered on its own `cb.tok.<role>.>`."""
    allowed = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        subjects.JS_FLOW_CONTROL_ALL,
        f"$JS.API.STREAM.INFO.{subjects.TOKENS_STREAM}",
        *subjects.js_consume_own(subjects.TOKENS_STREAM, subjects.tokens_of(role)),
    ]
    for stream in _STREAMS[role]:
        allowed += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            *subjects.js_read(stream),
        ]
    return allowed


def permissions(role: str) -> dict[str, Any]:
    """The nats-server `permissions` block of `role` (None for admin: everything)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    no_records = [s for stream in _RECORDS for s in subjects.js_destroy(stream)]
    no_jobs = [*subjects.js_consume(subjects.JOBS_STREAM), subjects.js_ack(subjects.JOBS_STREAM)]
    inbox = f"{subjects.inbox_prefix(role)}.>"
    # What a gateway keeps to resume streams holds users' prompts: gateways only.
    resume = [*subjects.js_read(_RESUME_KV), subjects.kv_all(subjects.RESUME_BUCKET)]
    nodes_kv = subjects.kv_all(subjects.NODES_BUCKET)
    if role == "node":
        # Nodes see every prompt they serve and write every token: they keep the whole JetStream API.
        pub = [subjects.tokens_all(), nodes_kv, subjects.JS_API_ALL, subjects.JS_FLOW_CONTROL_ALL]
        pub.append(subjects.kv_all(subjects.METRICS_BUCKET))
        sub = [*_ASK, inbox]
        deny_pub = [*no_records, *no_jobs, subjects.kv_all(subjects.JOBS_BUCKET), *resume]
        # Replies go to the asker's inbox: allowed once per request received, and nowhere else.
        return {
            "publish": {"allow": pub, "deny": deny_pub},
            "subscribe": {"allow": sub},
            "allow_responses": True,
        }
    if role == "admin":
        return {}
    asks = [*_ASK, *_jetstream(role), "$KV.>"]
    deny = [subjects.tokens_all(), nodes_kv, *no_records]  # nobody but a node forges tokens or nodes
    # Keys are an admin's to make, metrics a node's to put; limit counters and usage a gateway's.
    deny += [subjects.kv_all(b) for b in (subjects.KEYS_BUCKET, subjects.METRICS_BUCKET)]
    if role != "gateway":
        deny += [subjects.kv_all(b) for b in (subjects.LIMITS_BUCKET, subjects.USAGE_BUCKET)]
    if role == "gateway":
        pub, deny = asks, [*deny, *no_jobs, subjects.kv_all(subjects.JOBS_BUCKET)]
        sub = [inbox]
    elif role == "ui":
        pub = [
            *asks,
            subjects.jobs_all(),
            subjects.job_events_all(),
            subjects.job_control_all(),
            subjects.logs_all(),
            "$O.>",
        ]
        deny = [*deny, *no_jobs, *resume]
        sub = [inbox]
    else:  # worker
        # A worker drops its checkpoints from the artifacts (an object delete purges their chunks).
        own = subjects.js_destroy(f"OBJ_{subjects.ARTIFACTS_BUCKET}")[1]
        pub = [*asks, subjects.job_events_all(), subjects.JS_ACK_ALL, "$O.>", own]
        sub = [inbox, subjects.job_control_all()]
        deny = [d for d in deny if d != own] + resume
    return {"publish": {"allow": pub, "deny": deny}, "subscribe": {"allow": sub}}


@dataclass(frozen=True)
class Provisioned:
    """What `provision` made: the server config and a password per role."""

    config: Path
    passwords: dict[str, str]


def provision(state_dir: Path) -> Provisioned:
    """Passwords per role (made once, kept in `<state>/auth/passwords.json`) and the server config."""
    folder = private_dir(private_dir(state_dir) / "auth")
    store = folder / "passwords.json"
    try:
        passwords = {k: v for k, v in json.loads(store.read_text()).items() if k in ROLES}
    except (OSError, ValueError):
        passwords = {}
    if set(passwords) != set(ROLES):
        passwords = {role: passwords.get(role) or secrets.token_urlsafe(24) for role in ROLES}
        write_private(store, json.dumps(passwords, indent=1) + "\n")
    users = []
    for role in ROLES:
        user: dict[str, Any] = {"user": role, "password": passwords[role]}
        if perms := permissions(role):
            user["permissions"] = perms
        users.append(user)
    config = folder / "nats.conf"
    # nats-server reads JSON as its config syntax.
    write_private(config, json.dumps({"authorization": {"users": users}}, indent=1) + "\n")
    return Provisioned(config, passwords)


def local_url(state_dir: Path, role: str) -> str | None:
    """The URL of the bus a `chatbus up` with this state dir runs, with `role`'s credential (for
    `chatbus node` on the same machine); None if none runs or it has no credentials."""
    url = read_nats_url(state_dir)
    try:
        password = json.loads((state_dir / "auth" / "passwords.json").read_text())[role]
    except (OSError, ValueError, KeyError):
        return None
    if url is None or credential_of(url)[0] is None:
        return url
    return with_credential(url, role, password)


def with_credential(url: str, user: str, password: str) -> str:
    """`url` (one or several comma-separated servers) with `user:password@` on every server."""
    out = []
    for part in url.split(","):
        s = urlsplit(part.strip())
        host = s.netloc.rpartition("@")[2]
        out.append(urlunsplit(s._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}")))
    return ",".join(out)


def credential_of(url: str) -> tuple[str | None, str | None]:
    """The (user, password) inside `url`, if any (the first server that has one)."""
    for part in url.split(","):
        s = urlsplit(part.strip())
        if s.username is not None:
            return unquote(s.username), unquote(s.password) if s.password is not None else None
    return None, None


def redact(url: str) -> str:
    """`url` fit to print: passwords and tokens replaced by ***."""
    out = []
    for part in url.split(","):
        s = urlsplit(part.strip())
        if "@" in s.netloc:
            info, _, host = s.netloc.rpartition("@")
            user = info.split(":", 1)[0] if ":" in info else ""
            s = s._replace(netloc=f"{user}:***@{host}" if user else f"***@{host}")
        out.append(urlunsplit(s))
    return ",".join(out)
