"""Who may do what on the bus: one credential per role, the server config that enforces it, and URLs.

`chatbus up` provisions a password per role once (kept private in the state dir) and writes the
embedded server's config from them. Each process gets its role's credential inside its NATS URL
(`nats://node:SECRET@host:port`, handed over in the environment, never on a command line), so no
flag had to be plumbed through every package; `redact()` keeps secrets out of every message.

Roles: a **node** serves models (takes requests in the nodes' queue group, answers them, publishes
tokens and its own heartbeats, and no JetStream API beyond that); a **gateway**
asks nodes; a **ui** (web app, terminal chat, CLI) asks nodes, submits jobs and writes chat logs; a
**worker** (trainer, judge) consumes jobs and asks nodes; **admin** may do anything (operators'
tools). What each may not do is what the tests check: only nodes publish tokens and heartbeats, only
nodes take requests, only workers consume or acknowledge jobs, nobody reads another role's replies
(each role has its own inbox prefix), and nobody but admin deletes or purges a record stream.

Beside the roles, `Issued` credentials (`chatbus node-token` / `worker-token`, bus/tokens.py) give one
node or worker a NATS user of its own: a node's is pinned to its id and the models it may serve.
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
    "ASKERS",
    "ROLES",
    "Issued",
    "Provisioned",
    "across_leafnodes",
    "credential_of",
    "issued",
    "leaf_node_permissions",
    "local_url",
    "node_permissions",
    "permissions",
    "provision",
    "redact",
    "save_issued",
    "with_credential",
    "without_credential",
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
    # the web app's Usage page reads keys (names, limits, sha256 of secrets) and usage; writes stay denied
    "ui": (_NODES_KV, *_JOB_STREAMS, subjects.LOGS_STREAM, _OPS_KV[0], _OPS_KV[1], _OPS_KV[3]),
    "worker": (_NODES_KV, *_JOB_STREAMS),
}


def _jetstream(role: str, user: str, kinds: list[str] | None = None) -> list[str]:
    """The JetStream API calls an asking role may make: create, inspect and read its own streams
    (never update, delete or purge one, which could source or republish another stream into it),
    and on the token stream only consumers filtered on its own `cb.tok.<user>.>`. A worker with
    `kinds` uses the job queue only through its kinds' consumers."""
    allowed = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        subjects.JS_FLOW_CONTROL_ALL,
        f"$JS.API.STREAM.INFO.{subjects.TOKENS_STREAM}",
        *subjects.js_consume_own(subjects.TOKENS_STREAM, subjects.tokens_of(user)),
    ]
    for stream in _STREAMS[role]:
        allowed += [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}"]
        if stream != subjects.JOBS_STREAM or kinds is None:
            allowed += subjects.js_read(stream)
    for kind in kinds or []:
        allowed += subjects.js_job_queue(kind)
    return allowed


def node_permissions(
    user: str, node_id: str | None = None, models: list[str] | None = None, adapters: bool = True
) -> dict[str, Any]:
    """What a node may do, and nothing else (None: any node id / any model, for the operator's own
    `node` role): take requests for its models (queue group only) and those routed to its id, hear
    its control subject, answer each request once (`allow_responses`: replies, probes), publish
    tokens (publish only: no consumer, read, purge or stream change on CB_TOKENS), put and delete
    its own heartbeat keys, and check that the token stream and node table exist. With `adapters`,
    it may also read the artifact store and job records (to fetch `--adapter`), never write them."""
    js = [
        "$JS.API.STREAM.NAMES",  # does CB_TOKENS exist (by subject; names only, no request ids)
        f"$JS.API.STREAM.INFO.{_NODES_KV}",  # opening the node table
        f"$JS.API.STREAM.INFO.KV_{subjects.METRICS_BUCKET}",  # opening the metrics bucket
        # prompts sent by reference, chunk by chunk by subject: encrypted, the key comes with the request
        f"$JS.API.DIRECT.GET.{subjects.PROMPTS_STREAM}.{subjects.prompts_all()}",
    ]
    if adapters:
        for stream in (f"OBJ_{subjects.ARTIFACTS_BUCKET}", f"KV_{subjects.JOBS_BUCKET}"):
            js += [f"$JS.API.STREAM.INFO.{stream}", *subjects.js_read(stream)]
        js.append(subjects.JS_FLOW_CONTROL_ALL)
    pub = [subjects.tokens_all(), *subjects.node_heartbeats(node_id, models), *js]
    pub.append(f"$KV.{subjects.METRICS_BUCKET}.{'*' if node_id is None else subjects.metrics_key(node_id)}")
    sub = [*subjects.node_serves(node_id, models), f"{subjects.inbox_prefix(user)}.>"]
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}, "allow_responses": True}


ASKERS = ("gateway", "ui", "worker")  # the roles that ask nodes


def leaf_node_permissions(
    user: str,
    node_id: str | None = None,
    models: list[str] | None = None,
    adapters: bool = False,
    askers: list[str] | None = None,
) -> dict[str, Any]:
    """`node_permissions` for the leafnode connection of a laptop's nats-server, behind which the node
    runs (docs/security.md, "A node behind a leafnode"). The hub enforces them on everything the
    laptop sends and on what it forwards to it. Two rules cannot cross a leafnode connection, as
    nats-server does not apply `allow_responses` nor queue-group permissions to one (nats-server
    issues #2949, #6281): the node answers into the askers' inboxes by subject (never an admin's),
    and takes its models' requests with a plain subscription. The JetStream calls come in the hub's
    domain form (`across_leafnodes`). Models, node id, tokens, heartbeats and reads stay as pinned.
    `askers`: the NATS users whose inboxes it may answer into (default: the asking roles)."""
    perms = node_permissions(user, node_id, models, adapters)
    perms.pop("allow_responses")
    pub, sub = perms["publish"]["allow"], perms["subscribe"]["allow"]
    inboxes = [f"{subjects.inbox_prefix(asker)}.>" for asker in askers or ASKERS]
    perms["publish"]["allow"] = [*pub, *across_leafnodes(pub), *inboxes]
    perms["subscribe"]["allow"] = [entry.split(" ")[0] for entry in sub]
    return perms


def across_leafnodes(allowed: list[str]) -> list[str]:
    """The same JetStream calls as they arrive from a laptop's leafnode server, whose mapping sends
    `$JS.API.>` and `$KV.>` into the hub's JetStream domain (`$JS.<domain>.API.…`, tests/cluster.py
    `leaf_config`): a leafnode that connects with this credential gets the same rights, no more."""
    out = []
    for subject in allowed:
        if subject.startswith("$JS.API."):
            out.append("$JS.*.API." + subject.removeprefix("$JS.API."))
        elif subject.startswith("$KV."):
            out.append("$JS.*.API." + subject)
    return out


def permissions(role: str, user: str | None = None, kinds: list[str] | None = None) -> dict[str, Any]:
    """The nats-server `permissions` block of `role` for the NATS user `user` (default: the role's
    own user; {} for admin: everything); a worker with `kinds` takes only those kinds of jobs."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    user = user or role
    if role == "node":
        return node_permissions(user)
    if role == "admin":
        return {}
    no_records = [s for stream in _RECORDS for s in subjects.js_destroy(stream)]
    no_jobs = [*subjects.js_consume(subjects.JOBS_STREAM), subjects.js_ack(subjects.JOBS_STREAM)]
    inbox = f"{subjects.inbox_prefix(user)}.>"
    # What a gateway keeps to resume streams holds users' prompts: gateways only.
    resume = [*subjects.js_read(_RESUME_KV), subjects.kv_all(subjects.RESUME_BUCKET)]
    nodes_kv = subjects.kv_all(subjects.NODES_BUCKET)
    # A prompt too large for one message goes by reference, under the asker's own user (bus/prompts.py).
    asks = [*_ASK, *_jetstream(role, user, kinds), "$KV.>", subjects.prompts_of(user)]
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
            subjects.adapters_all(),  # `chatbus adapters load|unload|list`
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
        acks = [subjects.JS_ACK_ALL] if kinds is None else []  # else in _jetstream: its kinds' only
        pub = [*asks, subjects.adapters_all(), subjects.job_events_all(), *acks, "$O.>", own]
        sub = [inbox, subjects.job_control_all()]
        deny = [d for d in deny if d != own] + resume
        if kinds is None or "eval" in kinds:  # a judge submits eval jobs itself (triggers, adapter evals)
            pub.append(subjects.jobs_of("eval"))
    return {"publish": {"allow": pub, "deny": deny}, "subscribe": {"allow": sub}}


@dataclass(frozen=True)
class Provisioned:
    """What `provision` made: the server config and a password per role."""

    config: Path
    passwords: dict[str, str]


@dataclass(frozen=True)
class Issued:
    """A credential of its own for one node or worker (`chatbus node-token create`): its NATS user
    is `<role>-<name>`, and a node's id is its name, which its permissions pin."""

    name: str
    role: str  # node | worker
    password: str
    models: list[str] | None = None  # a node: the models it may serve (None: any)
    adapters: bool = False  # a node: may read the artifact store (to serve a trained adapter)
    kinds: list[str] | None = None  # a worker: the kinds of jobs it takes (None: train and eval)
    created: float = 0.0
    leaf: bool = False  # a node: for a laptop's leafnode remote (`leaf_node_permissions`)

    @property
    def user(self) -> str:
        return f"{self.role}-{self.name}"

    def permissions(self, askers: list[str] | None = None) -> dict[str, Any]:
        """`askers`: the users a leafnode credential may answer (default: the asking roles)."""
        if self.role == "node" and self.leaf:
            return leaf_node_permissions(self.user, self.name, self.models, self.adapters, askers)
        if self.role == "node":
            return node_permissions(self.user, self.name, self.models, self.adapters)
        return permissions(self.role, self.user, self.kinds)


def issued(state_dir: Path) -> dict[str, Issued]:
    """The credentials issued with this state dir (kept in `<state>/auth/issued.json`), by name."""
    try:
        raw = json.loads((state_dir / "auth" / "issued.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: Issued(name=name, **fields) for name, fields in raw.items()}


def save_issued(state_dir: Path, creds: dict[str, Issued]) -> None:
    """Keep `creds` and rewrite the server config from them (a reload then applies it)."""
    folder = private_dir(private_dir(state_dir) / "auth")
    raw = {name: {k: v for k, v in vars(c).items() if k != "name"} for name, c in sorted(creds.items())}
    write_private(folder / "issued.json", json.dumps(raw, indent=1) + "\n")
    provision(state_dir)


def provision(state_dir: Path) -> Provisioned:
    """Passwords per role (made once, kept in `<state>/auth/passwords.json`), and the server config
    with a user per role and per issued credential (`issued`)."""
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
    creds = issued(state_dir).values()
    askers = [*ASKERS, *(c.user for c in creds if c.role == "worker")]
    for cred in creds:
        users.append({"user": cred.user, "password": cred.password, "permissions": cred.permissions(askers)})
    config = folder / "nats.conf"
    # nats-server reads JSON as its config syntax; the pid file lets `chatbus node-token` reload it.
    text = json.dumps({"pid_file": str(folder / "nats.pid"), "authorization": {"users": users}}, indent=1)
    write_private(config, text + "\n")
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


def without_credential(url: str) -> str:
    """`url` with no `user:password@` on any server."""
    parts = (urlsplit(p.strip()) for p in url.split(","))
    return ",".join(urlunsplit(s._replace(netloc=s.netloc.rpartition("@")[2])) for s in parts)


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
