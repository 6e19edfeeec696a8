"""LlamaCppEngine: a GGUF model decoded by llama.cpp's own batching loop, in-process (xllamacpp).

Why this binding: it is the one prebuilt CPU wheel of llama.cpp on PyPI that installs in seconds and
runs here (docs/benchmarks.md has the trade-offs). It embeds llama.cpp's server loop — continuous
batching over `n_parallel` slots, prompt caching, its own sampling — behind a blocking call per
request that streams chunks to a callback; it does not hand out per-step logits, so token choice
happens inside llama.cpp (node/sampling.py and any grammar mask added to TokenChooser do not apply
here).

What stays ours, so both engines answer alike: the prompt is rendered and tokenized by the model's
own tokenizer (node/prompts.py) and sent as token ids; every generated id comes back (as the
chunk's logprob entry) and goes through the torch engine's TextStream, which holds back partial
characters and possible stop-string prefixes. Stop strings, max_tokens and cancels are applied here;
returning True from the callback ends the request inside llama.cpp.

One thread per running request waits in that blocking call (llama.cpp batches them); at most
`max_running` run, `max_queued` more wait in the pool's queue, beyond that submit says busy.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.errors import BadRequest, ContextLengthExceeded, NodeBusy
from bus.prefixes import prefix_hashes
from bus.schemas import ChatMessage, ModelCard, SamplingParams, TokenLogprob, TopLogprob
from node.engine import Delta, EngineRequest, EngineStats, FinishReason, Sink
from node.prompts import encode, validate
from node.textstream import TextStream

__all__ = ["LlamaCppEngine", "import_llamacpp"]

log = logging.getLogger(__name__)

_TAIL = 4  # prompt tokens decoded with the output, so the first token keeps its leading space
_RATE_WINDOW_S = 5.0
_REMEMBERED = 256  # conversations whose prefix hashes we advertise (llama.cpp's prompt cache is LRU too)


def import_llamacpp() -> Any:
    """Import xllamacpp with OpenMP threads that sleep when idle.

    The wheel's llama.cpp uses OpenMP, whose threads spin between parallel regions by default: on a
    busy 2-core machine that collapses decoding (3.9 tok/s spinning vs 35 passive through the gateway,
    docs/benchmarks.md), though on a quiet one spinning is ~2x faster (81 vs 41). libgomp reads the
    setting once, when the library loads; a user's own OMP_WAIT_POLICY wins (empty: libgomp's default).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import xllamacpp

    return xllamacpp


@dataclass(eq=False)
class _Job:
    """One request's life inside the engine."""

    request: EngineRequest
    sink: Sink
    prompt: list[int]
    max_new: int
    stream: TextStream
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    finished: bool = False
    completion: int = 0
    unsent_tokens: int = 0
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    # For node/metrics.py, reported once on the first delta after the first token:
    submitted: float = field(default_factory=time.monotonic)
    taken: float | None = None  # a pool thread started its llama.cpp call
    first_token: float | None = None  # llama.cpp returned its first token (prompt processed)
    timed: bool = False


class LlamaCppEngine:
    """The Engine protocol (node/engine.py) over a GGUF file and the model's tokenizer."""

    def __init__(
        self,
        gguf: Path,
        tokenizer: Any,
        *,
        name: str,
        context_length: int,
        eos_ids: list[int],
        max_running: int = 16,
        max_queued: int = 64,
        threads: int | None = None,
        kv_tokens: int | None = None,
        prompt_cache_mib: int = 256,
    ) -> None:
        self._tok = tokenizer
        self._name = name
        self._context = context_length
        self._eos = set(eos_ids)
        self._max_running = max_running
        self._max_queued = max_queued
        self._threads = threads or os.cpu_count() or 1
        self._server = _start_server(
            gguf, max_running, self._threads, kv_tokens or context_length, prompt_cache_mib
        )
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}  # guarded by _lock: submitted and not finished
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = False
        self._steps: deque[tuple[float, int]] = deque()  # guarded by _lock
        self._held: OrderedDict[int, None] = OrderedDict()  # prefix hashes of recent conversations

    # ------------------------------------------------------------------------- Engine protocol

    @property
    def card(self) -> ModelCard:
        return ModelCard(name=self._name, context_length=self._context, can_embed=False)

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def dtype(self) -> str:
        return "gguf"

    @property
    def max_running(self) -> int:
        return self._max_running

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_running, thread_name_prefix=f"llamacpp-{self._name}")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            jobs = list(self._jobs.values())
        for job in jobs:
            self._finish(job, "cancelled")
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # each running call ends at its next chunk
        self._server = None  # its destructor joins llama.cpp's loop

    def count_tokens(self, messages: list[ChatMessage] | None, prompt: str | None) -> int:
        return len(encode(self._tok, messages, prompt))

    def submit(self, request: EngineRequest, sink: Sink) -> int:
        validate(request.params)
        if request.constraint is not None:  # llama.cpp samples inside its own loop: no per-row mask here
            raise BadRequest(
                "this node's engine (llama.cpp) cannot constrain its output (response_format, forced tool "
                "calls): send the request to a node started with --engine hf"
            )
        ids = encode(self._tok, request.messages, request.prompt, request.continuation, request.tools)
        room = self._context - len(ids)
        wanted = request.params.max_tokens
        if room < (wanted or 1):
            asked = f"max_tokens {wanted}" if wanted else "no room to generate"
            raise ContextLengthExceeded(
                f"prompt has {len(ids)} tokens, {asked}, model context is {self._context}"
            )
        job = _Job(
            request=request,
            sink=sink,
            prompt=ids,
            max_new=min(wanted or room, room),
            stream=TextStream(self._tok, ids[-_TAIL:], request.params.stop),
        )
        with self._lock:
            if self._stopping or self._pool is None:
                raise NodeBusy("engine is not running")
            if len(self._jobs) >= self._max_running + self._max_queued:
                raise NodeBusy(f"queue full ({self._max_queued} waiting)", retry_after_s=1.0)
            self._jobs[request.request_id] = job
            self._pool.submit(self._run, job)
        return len(ids)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:  # its llama.cpp call ends at its next chunk
            self._finish(job, "cancelled")

    def stats(self) -> EngineStats:
        with self._lock:
            running = sum(1 for j in self._jobs.values() if j.started)
            queued = len(self._jobs) - running
            held = list(self._held)
        return EngineStats(running=running, queued=queued, tokens_per_s=self._rate(), cached_prefixes=held)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        raise BadRequest("this node's llama.cpp engine serves no embeddings: use a node with --engine hf")

    # ------------------------------------------------------------------------- one request

    def _run(self, job: _Job) -> None:
        """On a pool thread: one blocking llama.cpp call, chunks handled as they come."""
        with job.lock:
            if job.finished:  # cancelled while queued
                return
            job.started, job.taken = True, time.monotonic()
        if job.request.messages:  # its prompt is in llama.cpp's cache from the first chunk on
            self._remember(job.request.messages)
        server = self._server
        try:
            assert server is not None
            result = server.handle_completions(self._body(job), lambda chunk: self._on_chunk(job, chunk))
        except Exception as exc:  # a failed request fails alone, never the node
            log.exception("llama.cpp request %s failed", job.request.request_id)
            self._finish(job, "error", error=f"{type(exc).__name__}: {exc}")
            return
        error = _error_of(result)
        if error:
            self._finish(job, "error", error=error)
        elif not job.finished:  # llama.cpp ended it (end of generation or its own length limit)
            self._finish(job, "length" if job.completion >= job.max_new else "stop", job.stream.flush())

    def _body(self, job: _Job) -> dict[str, Any]:
        p: SamplingParams = job.request.params
        return {
            "prompt": job.prompt,
            "stream": True,
            "max_tokens": job.max_new,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,  # 0: off, as in our SamplingParams
            "min_p": 0.0,  # llama.cpp's default 0.05 would cut what OpenAI's API keeps
            "seed": p.seed if p.seed is not None else random.getrandbits(31),
            "repeat_penalty": p.repetition_penalty,
            "repeat_last_n": self._context,  # the whole context, as transformers' repetition penalty
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "logprobs": max(1, p.top_logprobs),  # each chunk's entry carries the token id
            "cache_prompt": True,
        }

    def _on_chunk(self, job: _Job, chunk: dict[str, Any]) -> bool:
        """Each generated token → TextStream; True ends the request inside llama.cpp."""
        if job.finished:
            return True
        error = _error_of(chunk)
        if error:
            self._finish(job, "error", error=error)
            return True
        choice = (chunk.get("choices") or [{}])[0]
        entries = (choice.get("logprobs") or {}).get("content") or []
        text = ""
        with job.lock:
            for entry in entries:
                reason, piece = self._accept(job, entry)
                text += piece
                if reason is not None:
                    self._finish_locked(job, reason, text)
                    break
            else:
                if text:
                    self._send(job, Delta(request_id=job.request.request_id, text=text, **self._counts(job)))
        if entries:
            with self._lock:
                self._steps.append((time.perf_counter(), len(entries)))
        return job.finished

    def _accept(self, job: _Job, entry: dict[str, Any]) -> tuple[FinishReason | None, str]:
        token = int(entry["id"])
        if job.first_token is None:
            job.first_token = time.monotonic()
        job.completion += 1
        job.unsent_tokens += 1
        p = job.request.params
        if p.logprobs or p.top_logprobs:
            top = [TopLogprob(token=t["token"], logprob=t["logprob"]) for t in entry.get("top_logprobs", [])]
            job.unsent_logprobs.append(
                TokenLogprob(token=entry["token"], logprob=entry["logprob"], top=top[: p.top_logprobs])
            )
        if token in self._eos:
            return "stop", job.stream.flush()
        text = job.stream.push(token)
        if job.stream.stopped:
            return "stop", text
        if job.completion >= job.max_new:
            return "length", text + job.stream.flush()
        return None, text

    # ------------------------------------------------------------------------- output

    def _finish(self, job: _Job, reason: FinishReason, text: str = "", error: str = "") -> None:
        with job.lock:
            self._finish_locked(job, reason, text, error)

    def _finish_locked(self, job: _Job, reason: FinishReason, text: str = "", error: str = "") -> None:
        if job.finished:
            return
        job.finished = True
        with self._lock:
            self._jobs.pop(job.request.request_id, None)
        if reason in ("stop", "length") and job.request.messages:
            self._remember([*job.request.messages, ChatMessage(role="assistant", content=job.stream.text)])
        delta = Delta(
            request_id=job.request.request_id,
            text=text,
            finish_reason=reason,
            error=error,
            **self._counts(job),
        )
        self._send(job, delta)

    def _remember(self, messages: list[ChatMessage]) -> None:
        """The conversation just answered is in llama.cpp's prompt cache: advertise its prefixes."""
        with self._lock:
            for h in prefix_hashes(messages):
                self._held.pop(h, None)
                self._held[h] = None
            while len(self._held) > _REMEMBERED:
                self._held.popitem(last=False)

    def _counts(self, job: _Job) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "tokens": job.unsent_tokens,
            "prompt_tokens": len(job.prompt),
            "completion_tokens": job.completion,
            "logprobs": job.unsent_logprobs or None,
        }
        job.unsent_tokens, job.unsent_logprobs = 0, []
        if not job.timed and job.taken is not None and job.first_token is not None:
            counts["queue_s"], counts["prefill_s"] = job.taken - job.submitted, job.first_token - job.taken
            job.timed = True
        return counts

    def _send(self, job: _Job, delta: Delta) -> None:
        try:
            job.sink(delta)
        except Exception:  # a broken sink loses its own request, never the others
            log.exception("sink for %s failed; cancelling it", job.request.request_id)
            job.finished = True

    def _rate(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._steps and now - self._steps[0][0] > _RATE_WINDOW_S:
                self._steps.popleft()
            steps = list(self._steps)
        if len(steps) < 2:
            return 0.0
        return sum(n for _, n in steps[1:]) / max(now - steps[0][0], 1e-3)


def _start_server(gguf: Path, slots: int, threads: int, kv_tokens: int, prompt_cache_mib: int) -> Any:
    """llama.cpp's server loop over the GGUF: `slots` sequences sharing one KV cache of `kv_tokens`."""
    xlc = import_llamacpp()
    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_parallel = slots
    params.n_ctx = kv_tokens
    params.kv_unified = True  # one pool: a long conversation may use it all, short ones share it
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_ram_mib = prompt_cache_mib  # host-RAM prompt cache for conversations evicted from slots
    params.verbosity = -1
    # The binding also listens on a loopback HTTP port; nobody but this process may use it.
    params.api_keys = [secrets.token_hex(16)]
    return xlc.Server(params)


def _error_of(result: Any) -> str:
    if isinstance(result, dict) and result.get("error"):
        err = result["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)
    return ""
