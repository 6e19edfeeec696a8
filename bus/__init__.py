"""The bus contract and its one front door: every name a client (gateway, tui, webui, judge, trainer,
chatbus) uses is exported here, and clients import only from `bus` (tests/test_layering.py checks it).

Read it in this order: the wire messages (`ChatMessage`, `SamplingParams`, the stream events), the error
tree, then `BusClient` — connect, `chat()`, iterate a `ChatStream`. The rest serves operators: jobs,
logs, keys and limits, credentials, the embedded server. The modules behind these names are not API.
"""

from bus import subjects
from bus.artifacts import ArtifactInfo, write_info
from bus.artifacts import describe as describe_artifact
from bus.artifacts import fetch_with as fetch_artifact
from bus.auth import ROLES, local_url, redact, with_credential
from bus.auth import issued as issued_credentials
from bus.auth import provision as provision_credentials
from bus.client import BusClient
from bus.codec import decode, encode
from bus.connection import bucket_entries, connect, ensure_triggers_bucket
from bus.constraints import compile_grammar, json_schema_constraint, tool_call_constraint
from bus.errors import (
    BadMessage,
    BadRequest,
    BusError,
    BusUnavailable,
    Cancelled,
    Code,
    ContextLengthExceeded,
    GenerationFailed,
    InvalidName,
    JobCancelled,
    ModelLoadError,
    ModelNotFound,
    NodeBusy,
    NodeTimeout,
    NoNodeAvailable,
    Unsupported,
    error_for,
)
from bus.jobs import JobContext, Jobs, JobWorker
from bus.keys import add_usage, cas_update, create_key, list_keys, list_usage, parse_duration, revoke_key
from bus.keys import digest as key_digest
from bus.logfmt import bind as bind_log_fields
from bus.logfmt import setup_logging
from bus.logs import read_logs
from bus.nodes import ModelEntry
from bus.operations import (
    LIMITS_TTL_S,
    KVMirror,
    MetricsView,
    Reconnects,
    ensure_keys_bucket,
    ensure_limits_bucket,
    ensure_metrics_bucket,
    ensure_usage_bucket,
)
from bus.operations import follow as follow_bucket
from bus.paths import (
    DEFAULT_NATS,
    add_nats_option,
    clear_nats_url,
    default_cache_dir,
    default_state_dir,
    read_nats_url,
    resolve_nats,
    write_nats_url,
)
from bus.prefixes import prefix_hashes
from bus.schemas import (
    ChatMessage,
    Chunk,
    Constraint,
    Done,
    EmbedRequest,
    Failed,
    GenerateRequest,
    NodeInfo,
    SamplingParams,
    StreamEvent,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    Usage,
)
from bus.schemas_adapters import AdapterCommand, AdapterReply, AdapterState
from bus.schemas_jobs import TERMINAL_STATES, JobEvent, JobRecord, combine_games
from bus.schemas_keys import KeyRecord, KeyUsage
from bus.schemas_logs import BATTLE_VOTES, ChatLog, ConvState, LogRecord, VoteLog
from bus.schemas_logs import Mode as LogMode
from bus.schemas_metrics import NodeMetrics
from bus.server import EmbeddedServer, stop_process_group
from bus.setup import prepare_bus
from bus.stream import Attempt, ChatStream
from bus.subjects import check_name
from bus.tokens import issue as issue_node_token
from bus.tokens import revoke as revoke_node_token
from bus.tool_calls import CallParser as ToolCallParser
from bus.tool_calls import Output as ToolCallOutput
from bus.tool_calls import parse_all as parse_tool_calls
from bus.tool_calls import readable as readable_tool_calls

__all__ = [  # noqa: RUF022 (grouped by topic: this list is the table of contents of the API)
    # the wire: messages and stream events
    "ChatMessage",
    "Constraint",
    "SamplingParams",
    "ToolCall",
    "ToolSpec",
    "GenerateRequest",
    "EmbedRequest",
    "Chunk",
    "Done",
    "Failed",
    "StreamEvent",
    "TokenLogprob",
    "Usage",
    "NodeInfo",
    "NodeMetrics",
    "decode",
    "encode",
    "subjects",
    "check_name",
    # errors
    "BusError",
    "BadMessage",
    "BadRequest",
    "InvalidName",
    "ContextLengthExceeded",
    "Unsupported",
    "ModelNotFound",
    "NodeBusy",
    "NoNodeAvailable",
    "NodeTimeout",
    "Cancelled",
    "JobCancelled",
    "BusUnavailable",
    "ModelLoadError",
    "GenerationFailed",
    "Code",
    "error_for",
    # the client
    "BusClient",
    "ChatStream",
    "Attempt",
    "ModelEntry",
    "connect",
    "bucket_entries",
    "prefix_hashes",
    # structured output and tool calls
    "combine_games",
    "compile_grammar",
    "json_schema_constraint",
    "tool_call_constraint",
    "ToolCallParser",
    "ToolCallOutput",
    "parse_tool_calls",
    "readable_tool_calls",
    # jobs and trained models
    "Jobs",
    "JobWorker",
    "JobContext",
    "JobEvent",
    "JobRecord",
    "AdapterCommand",
    "AdapterReply",
    "AdapterState",
    "TERMINAL_STATES",
    "ArtifactInfo",
    "describe_artifact",
    "fetch_artifact",
    "write_info",
    # chat and vote logs
    "ChatLog",
    "VoteLog",
    "ConvState",
    "LogRecord",
    "LogMode",
    "BATTLE_VOTES",
    "read_logs",
    # keys, limits, metrics (operators)
    "KeyRecord",
    "KeyUsage",
    "create_key",
    "list_keys",
    "revoke_key",
    "key_digest",
    "parse_duration",
    "add_usage",
    "list_usage",
    "cas_update",
    "LIMITS_TTL_S",
    "KVMirror",
    "MetricsView",
    "Reconnects",
    "follow_bucket",
    "ensure_keys_bucket",
    "ensure_limits_bucket",
    "ensure_metrics_bucket",
    "ensure_usage_bucket",
    "ensure_triggers_bucket",
    # credentials, the embedded server, setup, paths, logging
    "ROLES",
    "provision_credentials",
    "issued_credentials",
    "issue_node_token",
    "revoke_node_token",
    "local_url",
    "redact",
    "with_credential",
    "EmbeddedServer",
    "stop_process_group",
    "prepare_bus",
    "DEFAULT_NATS",
    "add_nats_option",
    "resolve_nats",
    "read_nats_url",
    "write_nats_url",
    "clear_nats_url",
    "default_cache_dir",
    "default_state_dir",
    "setup_logging",
    "bind_log_fields",
]
