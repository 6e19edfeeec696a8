"""The only place subject strings, stream and bucket names are built."""

from __future__ import annotations

import re

from bus.errors import InvalidName

__all__ = [
    "ANONYMOUS",
    "KEYS_BUCKET",
    "LIMITS_BUCKET",
    "MAX_NAME_BYTES",
    "METRICS_BUCKET",
    "NODES_BUCKET",
    "NODE_QUEUE",
    "RESUME_BUCKET",
    "TOKENS_STREAM",
    "USAGE_BUCKET",
    "adapters",
    "adapters_all",
    "check_name",
    "count",
    "ctl",
    "embed",
    "gen",
    "gen_node",
    "kv_token",
    "node_key",
    "safe_token",
    "token",
    "tokens_all",
    "tokens_of",
]

PREFIX = "cb"
TOKENS_STREAM = "CB_TOKENS"
NODES_BUCKET = "cb_nodes"
RESUME_BUCKET = "cb_resume"  # KV: what a gateway needs to resume a stream (request, attempts), TTL as tokens
NODE_QUEUE = "cb-nodes"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
# Every name that becomes a subject token (models, node ids, adapters, job ids, owners, request ids)
# is bounded here: nats-server closes the connection of a client whose protocol line passes its
# max_control_line (4 KiB), so one unbounded name from an HTTP body would take a gateway off the bus.
# Escaped, a name is at most 3x its UTF-8 bytes; a subject holds at most two names and a short prefix.
MAX_NAME_BYTES = 256


def check_name(value: object, what: str = "name") -> str:
    """`value` if it may name something on the bus, else InvalidName saying why (`what` names the
    field: model, node_id, job_id...). The one rule every edge and every subject builder applies."""
    if not isinstance(value, str):
        raise InvalidName(what, f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidName(what, f"{what} must not be empty")
    size = len(value.encode())
    if size > MAX_NAME_BYTES:
        raise InvalidName(
            what,
            f"{what} is {size} bytes long (UTF-8); names on the bus are 1 to {MAX_NAME_BYTES} bytes",
        )
    if not value.isprintable():
        raise InvalidName(what, f"{what} {value[:40]!r} contains control characters")
    return value


def safe_token(name: str, what: str = "name") -> str:
    """A reversible NATS subject token for a name (checked by `check_name`; '.', '/', ' ' and
    friends are %-escaped)."""
    check_name(name, what)
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)


def gen(model: str) -> str:
    """Any node serving `model` (queue group)."""
    return f"{PREFIX}.gen.{safe_token(model, 'model')}"


def gen_node(model: str, node_id: str) -> str:
    """One chosen node, for load-aware routing."""
    return f"{PREFIX}.gen.{safe_token(model, 'model')}.{safe_token(node_id, 'node_id')}"


ANONYMOUS = "_"  # the owner of requests from a connection without a user name


def token(owner: str, request_id: str) -> str:
    """The token stream of one request (in TOKENS_STREAM), under its asker's NATS user name: the
    server lets each credential create consumers on its own `cb.tok.<user>.>` only (bus/auth.py)."""
    return f"{_tokens_prefix(owner)}.{safe_token(request_id, 'request_id')}"


def tokens_of(owner: str) -> str:
    return f"{_tokens_prefix(owner)}.>"


def _tokens_prefix(owner: str) -> str:
    return f"{PREFIX}.tok.{safe_token(owner or ANONYMOUS, 'owner')}"


def tokens_all() -> str:
    return f"{PREFIX}.tok.>"


def ctl(node_id: str) -> str:
    """Cancel and keep-alive messages for one node, and probes (core requests it answers from its
    event loop: no responders at once means its process is gone)."""
    return f"{PREFIX}.ctl.{safe_token(node_id, 'node_id')}"


def node_key(node_id: str, model: str) -> str:
    """A node's heartbeat key in NODES_BUCKET: `<node>.<model>`, so the server's permissions can
    pin a node credential to its own id and the models it may serve (bus/auth.py)."""
    return f"{kv_token(node_id)}.{kv_token(model)}"


def kv_token(name: str) -> str:
    """`safe_token` fit for a KV key (which allows `=` but not `%`)."""
    return safe_token(name).replace("%", "=")


def adapters(node_id: str) -> str:
    """Load, unload and list the LoRA adapters one node serves (core request/reply)."""
    return f"{PREFIX}.adapters.{safe_token(node_id, 'node_id')}"


def adapters_all() -> str:
    return f"{PREFIX}.adapters.>"


def embed(model: str) -> str:
    return f"{PREFIX}.embed.{safe_token(model, 'model')}"


def count(model: str) -> str:
    return f"{PREFIX}.count.{safe_token(model, 'model')}"


# ----------------------------------------------------------------------------- jobs

JOBS_STREAM = "CB_JOBS"
JOB_EVENTS_STREAM = "CB_JOB_EVENTS"
JOBS_BUCKET = "cb_jobs"
ARTIFACTS_BUCKET = "cb_artifacts"


def job(kind: str, job_id: str) -> str:
    """A submitted job in the work queue (kind: train | eval)."""
    return f"{PREFIX}.job.{safe_token(kind, 'kind')}.{safe_token(job_id, 'job_id')}"


def jobs_of(kind: str) -> str:
    return f"{PREFIX}.job.{safe_token(kind)}.>"


def jobs_all() -> str:
    return f"{PREFIX}.job.>"


def job_workers(kind: str) -> str:
    """The durable consumer the workers of one kind share on JOBS_STREAM."""
    return f"cb-{safe_token(kind)}-workers"


def js_job_queue(kind: str) -> list[str]:
    """What a worker of one kind does with the job queue: create (a named create, filter in the
    subject), inspect and pull its kind's consumer, and acknowledge what it pulled."""
    durable = job_workers(kind)
    return [
        f"$JS.API.CONSUMER.CREATE.{JOBS_STREAM}.{durable}.{jobs_of(kind)}",
        f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{durable}",
        f"$JS.ACK.{JOBS_STREAM}.{durable}.>",
    ]


def job_events(job_id: str) -> str:
    return f"{PREFIX}.jobevt.{safe_token(job_id, 'job_id')}"


def job_events_all() -> str:
    return f"{PREFIX}.jobevt.>"


def job_control(job_id: str) -> str:
    """Cancel a running job (core publish; the record in JOBS_BUCKET also says cancelled)."""
    return f"{PREFIX}.jobctl.{safe_token(job_id, 'job_id')}"


# ----------------------------------------------------------------------------- chat & vote logs

LOGS_STREAM = "CB_LOGS"


def log_chat() -> str:
    """Every answer a user got in the web app (durable, in LOGS_STREAM)."""
    return f"{PREFIX}.log.chat"


def log_vote() -> str:
    """Every vote and flag (durable, in LOGS_STREAM)."""
    return f"{PREFIX}.log.vote"


def logs_all() -> str:
    return f"{PREFIX}.log.>"


# ----------------------------------------------------------------------------- eval triggers

EVAL_TRIGGERS_BUCKET = "cb_eval_triggers"  # KV: trigger id -> judge.schemas.EvalTrigger


# ----------------------------------------------------------------------------- permissions (bus/auth.py)
# Wildcards over our subjects, and the NATS / JetStream system subjects a role needs.


def gen_all() -> str:
    return f"{PREFIX}.gen.>"


def ctl_all() -> str:
    return f"{PREFIX}.ctl.>"


def embed_all() -> str:
    return f"{PREFIX}.embed.>"


def count_all() -> str:
    return f"{PREFIX}.count.>"


def _any(name: str | None) -> str:
    return "*" if name is None else safe_token(name)


def node_serves(node_id: str | None, models: list[str] | None) -> list[str]:
    """What a node subscribes to (None: any id / any model): its models' request subjects in the
    nodes' queue group only (`subject queue`: a plain subscription, which would copy every request
    meant for other nodes, is refused), requests routed to it by id, its control subject and its
    adapter commands."""
    out = []
    for m in models if models is not None else [None]:
        model = _any(m)
        out += [f"{PREFIX}.{kind}.{model} {NODE_QUEUE}" for kind in ("gen", "embed", "count")]
        out.append(f"{PREFIX}.gen.{model}.{_any(node_id)}")
    return [*out, f"{PREFIX}.ctl.{_any(node_id)}", f"{PREFIX}.adapters.{_any(node_id)}"]


def node_heartbeats(node_id: str | None, models: list[str] | None) -> list[str]:
    """The NODES_BUCKET keys a node may put and delete (None: any id / any model)."""
    node = "*" if node_id is None else kv_token(node_id)
    keys = ["*"] if models is None else [kv_token(m) for m in models]
    return [f"$KV.{NODES_BUCKET}.{node}.{key}" for key in keys]


def job_control_all() -> str:
    return f"{PREFIX}.jobctl.>"


def inbox_prefix(user: str) -> str:
    """Each credential gets its own reply inboxes, so no role can read another's replies."""
    return f"_INBOX_{safe_token(user, 'user')}"


def kv_all(bucket: str) -> str:
    """Writes to a KV bucket."""
    return f"$KV.{bucket}.>"


def objects_all(bucket: str) -> str:
    """Writes to an object store bucket."""
    return f"$O.{bucket}.>"


JS_API_ALL = "$JS.API.>"
JS_ACK_ALL = "$JS.ACK.>"
JS_FLOW_CONTROL_ALL = "$JS.FC.>"


def js_consume(stream: str) -> list[str]:
    """Every JetStream API call that creates, reads or pulls from a consumer of `stream`."""
    return [
        f"$JS.API.CONSUMER.*.{stream}",  # CREATE.<stream>
        f"$JS.API.CONSUMER.*.{stream}.>",  # CREATE.<stream>.<name>.<filter>, INFO, DELETE
        f"$JS.API.CONSUMER.*.*.{stream}.>",  # DURABLE.CREATE, MSG.NEXT
    ]


def js_consume_own(stream: str, filter_subject: str) -> list[str]:
    """Consumers of `stream` filtered within `filter_subject`, and only those: a named create
    carries its filter in the subject (and the server checks it against the config), unnamed and
    durable creates do not, so those are left out."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.*.{filter_subject}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
    ]


def js_read(stream: str) -> list[str]:
    """Every JetStream API call that reads messages of `stream` (consumers and direct gets)."""
    return [
        *js_consume(stream),
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
    ]


def js_ack(stream: str) -> str:
    return f"$JS.ACK.{stream}.>"


def js_destroy(stream: str) -> list[str]:
    """Deleting or purging `stream` (a record nobody but an operator may wipe)."""
    return [f"$JS.API.STREAM.DELETE.{stream}", f"$JS.API.STREAM.PURGE.{stream}"]


# ----------------------------------------------------------------------------- operations (metrics, keys)

METRICS_BUCKET = "cb_metrics"  # KV: node id -> bus.schemas_metrics.NodeMetrics, TTL as nodes
KEYS_BUCKET = "cb_keys"  # KV: key name -> bus.keys.KeyRecord (sha256 of the secret, limits); admin writes
LIMITS_BUCKET = "cb_limits"  # KV: per-key, per-minute counters and open streams (gateways, CAS)
USAGE_BUCKET = "cb_usage"  # KV: per-key usage per day and model (gateways, CAS)


def metrics_key(node_id: str) -> str:
    return kv_token(node_id)


def key_record(name: str) -> str:
    return kv_token(name)


def limit_window(kind: str, key_name: str, minute: int) -> str:
    """A counter of `kind` (req | tok) for one key and one minute (unix minutes)."""
    return f"{kind}.{kv_token(key_name)}.{minute}"


def limit_streams(key_name: str, gateway_id: str) -> str:
    """The streams one gateway has open for one key (each gateway writes only its own)."""
    return f"streams.{kv_token(key_name)}.{kv_token(gateway_id)}"


def limit_streams_of(key_name: str) -> str:
    return f"streams.{kv_token(key_name)}.*"


def usage_key(key_name: str, day: str, model: str) -> str:
    """Usage of one key on one day (YYYY-MM-DD, UTC) with one model."""
    return f"{kv_token(key_name)}.{day}.{kv_token(model)}"
