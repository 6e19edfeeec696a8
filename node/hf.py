"""HFEngine: a transformers model served with our own continuous-batching decode loop.

Why our own loop: on CPU, transformers' continuous batching is ~3× slower than one padded batch and
TextIteratorStreamer costs ~15 ms a token (docs/benchmarks.md). One worker thread owns the model; each
iteration applies cancels, runs one prefill forward, merges what it finished into the running batch,
then runs one decode step for every running sequence. Sinks are called from that thread.

The batch: for Llama-family models (node/slotforward.py) a preallocated slot KV cache
(node/kvcache.py, node/slotbatch.py) that each step writes in place, with the model's own modules run
by a forward of ours (bf16 linears prepacked for oneDNN, node/packing.py); for any other model
transformers' forward over a left-padded DynamicCache (node/scheduler.py). Both offer the same
extend / decode / keep / merge, so this loop does not know which it drives.

Prefill: waiting requests are taken first come first served and prefilled together in one padded
forward while rows × longest uncached prompt part fits `prefill_chunk` tokens; a longer one is
prefilled alone, `prefill_chunk` tokens per iteration. Either way running streams wait at most one such
forward between two decode steps. A prompt whose start is in the prefix cache (node/prefix_cache.py:
the previous turn of a conversation, a shared system prompt) starts from a copy of those keys/values
and feeds only the rest. A finishing row's keys/values go into that cache before its last delta, and
EngineStats.cached_prefixes names the conversations held (bus.prefix_hashes), for cache-aware routing.

KV memory is a budget (`kv_cache_memory`, default a quarter of RAM): running rows reserve their prompt
plus max_tokens; a request that could never fit is rejected busy at submit, one that does not fit now
waits in the queue, and the prefix cache gives way (least recently used first, copies only, so never
a running row).

Why group prefills: on the 2-core CPU a forward costs ~50 ms whatever its size (weight reads at
small batch) plus ~1 ms per prompt token, so 16 chat prompts of ~40 tokens cost ~1.4 s one by one
and ~0.7 s together; 128 tokens already pays the fixed cost off, and every row of a group waits for
the whole group (docs/benchmarks.md).

Answers: in float32, greedy output equals `model.generate`'s token for token, alone, in a batch and
from a cached prefix (tests/test_engine_cache.py), up to numerical ties: where the reference's top-2
logit gap is under 1e-4, either token is right. In bf16 the same holds for each shape of matmul, but
rounding differs between shapes (a batch of 16 vs 1, 35 vs 2,000 columns), so near-ties may flip
with what else runs; that is bf16's tolerance, not a bug, and why equality is tested in float32.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from bus.errors import BadRequest, ContextLengthExceeded, NodeBusy
from bus.schemas import ChatMessage, ModelCard, TokenLogprob, TopLogprob
from node.engine import Delta, EngineRequest, EngineStats, FinishReason, Sink
from node.grammar import GrammarCompiler
from node.kvmemory import KVMemory
from node.loader import LoadedModel
from node.lora import AdapterSet
from node.prefix_cache import BLOCK
from node.prompts import encode, validate
from node.sampling import Choice, TokenChooser, choose_tokens
from node.sequence import Seq
from node.slotbatch import Batch
from node.textstream import TextStream

T = TypeVar("T")

__all__ = ["HFEngine", "TextStream"]

log = logging.getLogger(__name__)

_TAIL = 4  # prompt tokens decoded with the output, so the first token keeps its leading space
_RATE_WINDOW_S = 5.0
_SAVE_AT_PREFILL = 4 * BLOCK  # newly prefilled tokens worth keeping before the request ends


class HFEngine:
    """The Engine protocol (node/engine.py) over a LoadedModel, with continuous batching."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_running: int = 16,
        max_queued: int = 64,
        prefill_chunk: int = 128,
        kv_cache_memory: int | str | None = None,
        prefix_cache: bool = True,
        threads: int | None = None,
    ) -> None:
        self._m = loaded
        self._threads = threads  # torch's intra-op threads on the worker (None: torch's default)
        self._max_running = max_running
        self._max_queued = max_queued
        self._prefill_chunk = max(1, prefill_chunk)
        self._eos = set(loaded.eos_ids)
        self._vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
        self._grammars = GrammarCompiler.for_hf(loaded.tokenizer, self._vocab, loaded.eos_ids)
        self._cond = threading.Condition()
        self._queue: deque[Seq] = deque()  # guarded by _cond
        self._cancels: set[str] = set()  # guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the worker thread only:
        self._prefilling: list[Seq] = []  # out of the queue, not yet running (see _prefill_some)
        self._running: list[Seq] = []
        self._kv = KVMemory(loaded, kv_cache_memory, prefix_cache)
        self._joining: tuple[Batch, list[Seq]] | None = None  # rows of a prefill getting first tokens
        self._batch = self._kv.new_batch()
        self._steps: deque[tuple[float, int]] = deque()
        # Other torch work (embeddings) runs on the worker thread too, between two steps: a second
        # thread's OpenMP team slows every later decode step (node/packing.py's one_thread).
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # guarded by _cond
        # LoRA adapters served beside the base, per row (node/lora.py); wraps nothing until one loads.
        self.adapters = AdapterSet(loaded.model, loaded.name, loaded.context_length, self._on_worker)

    # ------------------------------------------------------------------------- Engine protocol

    @property
    def card(self) -> ModelCard:
        return ModelCard(name=self._m.name, context_length=self._m.context_length, can_embed=True)

    @property
    def device(self) -> str:
        return self._m.device

    @property
    def dtype(self) -> str:
        return self._m.dtype

    @property
    def max_running(self) -> int:
        return self._max_running

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"engine-{self._m.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:  # never started: the queue still deserves its final deltas
            self._finish_everything("cancelled")

    def count_tokens(self, messages: list[ChatMessage] | None, prompt: str | None) -> int:
        return len(encode(self._m.tokenizer, messages, prompt, ""))

    def submit(self, request: EngineRequest, sink: Sink) -> int:
        validate(request.params)
        ids = encode(self._m.tokenizer, request.messages, request.prompt, request.continuation, request.tools)
        room = self._m.context_length - len(ids)
        wanted = request.params.max_tokens
        if room < (wanted or 1):
            asked = f"max_tokens {wanted}" if wanted else "no room to generate"
            raise ContextLengthExceeded(
                f"prompt has {len(ids)} tokens, {asked}, model context is {self._m.context_length}"
            )
        max_new = min(wanted or room, room)
        self._kv.check(len(ids) + max_new)
        seq = Seq(
            request=request,
            sink=sink,
            prompt=ids,
            max_new=max_new,
            reserve=len(ids) + max_new,
            chooser=TokenChooser(
                request.params,
                ids,
                self._vocab,
                torch.device(self._m.device),
                grammar=self._grammars.row(request.constraint, request.continuation),
            ),
            stream=TextStream(self._m.tokenizer, ids[-_TAIL:], request.params.stop),
        )
        seq.adapter = (
            self.adapters.acquire(request.adapter) if request.adapter else None
        )  # held until it ends
        with self._cond:
            refused = None
            if self._stopping:
                refused = NodeBusy("engine is shutting down")
            elif len(self._queue) >= self._max_queued:
                refused = NodeBusy(f"queue full ({self._max_queued} waiting)", retry_after_s=1.0)
            if refused is not None:
                self._release(seq)
                raise refused
            self._queue.append(seq)
            self._cond.notify_all()
        return len(ids)

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify_all()

    def stats(self) -> EngineStats:
        with self._cond:
            queued = len(self._queue)
        active = [*self._running, *self._prefilling]  # a finished row may not be dropped yet
        running = sum(1 for s in active if not s.finished)
        return EngineStats(
            running=running,
            queued=queued,
            tokens_per_s=self._rate(),
            cached_prefixes=self._kv.advertised,
            kv_cache_usage=self._kv.usage,
            prefix_cache_queries=self._kv.queried_tokens,
            prefix_cache_hits=self._kv.hit_tokens,
        )

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised last hidden states, all texts in one right-padded forward."""
        if not texts or any(not t for t in texts):
            raise BadRequest("embeddings need at least one input and no empty strings")
        tok = self._m.tokenizer
        batch = tok(texts, padding=True, padding_side="right", return_tensors="pt").to(self._m.device)
        mask = batch["attention_mask"]

        def forward() -> tuple[list[list[float]], int]:
            hidden = self._m.model.get_decoder()(**batch).last_hidden_state.float()
            keep = mask.unsqueeze(-1).bool()
            summed = torch.where(keep, hidden, torch.zeros_like(hidden)).sum(dim=1)
            mean = summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
            vectors = torch.nn.functional.normalize(mean, dim=-1)
            return vectors.cpu().tolist(), int(mask.sum())

        return self._on_worker(forward)

    def _on_worker(self, call: Callable[[], T]) -> T:
        """Run `call` on the worker thread between two steps and wait for its result."""
        done: Future[T] = Future()
        with self._cond:
            if self._stopping:
                raise NodeBusy("the engine is shutting down")
            if self._thread is None:  # not started: nothing else uses torch yet
                return call()
            self._calls.append((call, done))
            self._cond.notify()
        return done.result()

    # ------------------------------------------------------------------------- the worker

    def _work(self) -> None:
        if self._threads:  # per thread in OpenMP: set where the steps run
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while self._wait_for_work():
                self._run_calls()
                try:
                    self._prefill_some()
                    self._decode_step()
                except Exception as exc:  # a failed forward fails the batch, never the node
                    log.exception("engine step failed")
                    self._fail_active(f"{type(exc).__name__}: {exc}")
                self._kv.measure(self._batch)
            self._run_calls()  # asked for before stop(): answered, not left waiting
            self._finish_everything("cancelled")

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; apply cancels. False once stop() was called."""
        with self._cond:
            while not (
                self._stopping
                or self._cancels
                or self._calls
                or self._queue
                or self._running
                or self._prefilling
            ):
                self._cond.wait()
            cancels, self._cancels = self._cancels, set()
            if cancels:
                dropped = [s for s in self._queue if s.request.request_id in cancels]
                for seq in dropped:
                    self._queue.remove(seq)
            stopping = self._stopping
        if cancels:
            for seq in dropped:
                self._finish(seq, "cancelled")
            self._cancel_active(cancels)
        return not stopping

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, deque()
        for call, done in calls:
            try:
                done.set_result(call())
            except BaseException as e:  # the caller gets it; the worker goes on
                done.set_exception(e)

    def _cancel_active(self, ids: set[str]) -> None:
        if any(seq.request.request_id in ids for seq in self._prefilling):
            for seq in self._prefilling:  # only a chunked prompt spans iterations: a group of one
                self._finish(seq, "cancelled")
                seq.kv = None
            self._prefilling = []
        for seq in self._running:
            if seq.request.request_id in ids:
                self._finish(seq, "cancelled")
        self._running = self._drop_finished(self._batch, self._running)

    def _prefill_some(self) -> None:
        """One prefill forward: a group of whole prompts, or the next chunk of a long one."""
        if not self._prefilling:
            self._prefilling = self._take_group()
            first = self._prefilling[0] if len(self._prefilling) == 1 else None
            if first is not None and len(first.prompt) - first.cached > self._prefill_chunk:
                first.kv = self._kv.start_batch([first])
        if not self._prefilling:
            return
        if self._prefilling[0].kv is not None:
            self._prefill_chunk_of(self._prefilling[0])
        else:
            self._prefill_group(self._prefilling)

    def _take_group(self) -> list[Seq]:
        """Queued requests, first come first served, while their padded prompts fit `prefill_chunk`
        and the KV cache they may grow to fits the budget (the prefix cache gives way, LRU first)."""
        group: list[Seq] = []
        longest = 0
        with self._cond:
            while self._queue and len(self._running) + len(group) < self._max_running:
                seq = self._queue[0]
                self._kv.lookup(seq)
                size = len(seq.prompt) - seq.cached
                if group and (len(group) + 1) * max(longest, size) > self._prefill_chunk:
                    break  # a prompt longer than the budget is taken alone, and chunked
                if not self._kv.admit(self._running, [*group, seq]):
                    break  # waits for running rows to finish; never evicts them
                group.append(self._queue.popleft())
                seq.take()
                longest = max(longest, size)
        if group:  # admitting may have evicted prefixes: advertise what is left (not every step)
            self._kv.advertise()
        return group

    def _prefill_group(self, group: list[Seq]) -> None:
        """Whole prompts (past their cached prefixes) in one padded forward."""
        batch = self._kv.start_batch(group)
        rest = [seq.prompt[seq.cached :] for seq in group]
        started = time.perf_counter()
        with self.adapters.rows([s.adapter for s in group]):
            logits = batch.extend(rest)
        log.debug(
            "prefill: %d rows × %d columns in %.1f ms (%d cached tokens)",
            len(group),
            max(len(r) for r in rest),
            1000 * (time.perf_counter() - started),
            sum(s.cached for s in group),
        )
        self._join(group, batch, logits)

    def _prefill_chunk_of(self, seq: Seq) -> None:
        """The next `prefill_chunk` tokens of a long prompt, alone: running streams wait one chunk."""
        assert seq.kv is not None
        take = min(self._prefill_chunk, len(seq.prompt) - seq.prefilled)
        with self.adapters.rows([seq.adapter]):
            logits = seq.kv.extend([seq.prompt[seq.prefilled : seq.prefilled + take]])
        seq.prefilled += take
        log.debug("prefill: 1 row, chunk of %d tokens (%d/%d)", take, seq.prefilled, len(seq.prompt))
        if seq.prefilled == len(seq.prompt):
            kv, seq.kv = seq.kv, None
            self._join([seq], kv, logits)

    def _join(self, seqs: list[Seq], kv: Batch, logits: torch.Tensor) -> None:
        """First tokens from the prefill logits; the rows that go on join the running batch."""
        for row, seq in enumerate(seqs):
            if len(seq.prompt) - seq.cached >= _SAVE_AT_PREFILL:  # a shared system prompt, a long turn
                self._kv.save(kv, row, seq, seq.prompt, [])
        self._joining = (kv, seqs)
        for seq, choice in zip(seqs, choose_tokens(logits, [s.chooser for s in seqs]), strict=True):
            seq.prefilled = len(seq.prompt)
            seq.prefilled_now()
            self._accept(seq, choice)
        self._joining = None
        self._drop_finished(kv, seqs)
        self._batch.merge(kv)  # type: ignore[arg-type]  # both are the engine's one kind
        self._running.extend(seq for seq in seqs if not seq.finished)
        self._prefilling = []

    def _decode_step(self) -> None:
        if not self._running:
            return
        started = time.perf_counter()
        with self.adapters.rows([s.adapter for s in self._running]):
            logits = self._batch.decode([s.next_token for s in self._running])
        choices = choose_tokens(logits, [s.chooser for s in self._running])
        for seq, choice in zip(self._running, choices, strict=True):
            self._accept(seq, choice)
        self._steps.append((time.perf_counter(), len(choices)))
        log.debug("decode step: %d rows in %.1f ms", len(choices), 1000 * (time.perf_counter() - started))
        self._running = self._drop_finished(self._batch, self._running)

    def _drop_finished(self, batch: Batch, seqs: list[Seq]) -> list[Seq]:
        keep = [i for i, s in enumerate(seqs) if not s.finished]
        if len(keep) < len(seqs):
            batch.keep(keep)
        return [seqs[i] for i in keep]

    def _save_finished(self, seq: Seq) -> None:
        """Keep a finishing row's KV in the prefix cache (before its last delta: a client's next turn
        may come at once, and the node already advertises it)."""
        where = None
        if self._joining is not None and seq in self._joining[1]:
            where = (self._joining[0], self._joining[1].index(seq))
        elif seq in self._running:
            where = (self._batch, self._running.index(seq))
        if where is not None:
            self._kv.save(where[0], where[1], seq, seq.prompt + seq.generated, [seq.reply()])

    # ------------------------------------------------------------------------- output

    def _accept(self, seq: Seq, choice: Choice) -> None:
        """Account one generated token and tell the sink what became final."""
        seq.completion += 1
        seq.unsent_tokens += 1
        seq.next_token = choice.token
        seq.generated.append(choice.token)
        if choice.logprob is not None:
            seq.unsent_logprobs.append(self._logprob(choice))
        reason: FinishReason | None = None
        if choice.token in self._eos:
            text, reason = seq.stream.flush(), "stop"
        else:
            text = seq.stream.push(choice.token)
            if seq.stream.stopped:
                reason = "stop"
            elif seq.completion >= seq.max_new:
                text, reason = text + seq.stream.flush(), "length"
        if reason is not None:
            self._finish(seq, reason, text)
        elif text:
            self._send(seq, Delta(request_id=seq.request.request_id, text=text, **seq.counts()))

    def _finish(self, seq: Seq, reason: FinishReason, text: str = "", error: str = "") -> None:
        if seq.finished:
            return
        seq.finished, seq.reason = True, reason
        if reason in ("stop", "length", "cancelled"):
            self._save_finished(seq)
        self._release(seq)
        delta = Delta(
            request_id=seq.request.request_id,
            text=text,
            finish_reason=reason,
            error=error,
            **seq.counts(),
        )
        self._send(seq, delta)

    def _send(self, seq: Seq, delta: Delta) -> None:
        try:
            seq.sink(delta)
        except Exception:  # a broken sink loses its own request, never the batch
            log.exception("sink for %s failed; cancelling it", seq.request.request_id)
            seq.finished = True
            self._release(seq)

    def _release(self, seq: Seq) -> None:
        """Give back the row's hold on its adapter (once), so an unload waiting for it can finish."""
        adapter, seq.adapter = seq.adapter, None
        if adapter is not None:
            self.adapters.release(adapter)

    def _logprob(self, choice: Choice) -> TokenLogprob:
        decode = self._m.tokenizer.decode
        top = [TopLogprob(token=decode([t]), logprob=lp) for t, lp in choice.top]
        return TokenLogprob(token=decode([choice.token]), logprob=choice.logprob or 0.0, top=top)

    def _fail_active(self, error: str) -> None:
        for seq in [*self._running, *self._prefilling]:
            self._finish(seq, "error", error=error)
            seq.kv = None
        self._running, self._prefilling = [], []
        self._batch = self._kv.new_batch()

    def _finish_everything(self, reason: FinishReason) -> None:
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for seq in [*self._running, *self._prefilling, *queued]:
            self._finish(seq, reason)
            seq.kv = None
        self._running, self._prefilling = [], []
        self._batch = self._kv.new_batch()

    def _rate(self) -> float:
        now = time.perf_counter()
        while self._steps and now - self._steps[0][0] > _RATE_WINDOW_S:
            self._steps.popleft()
        steps = list(self._steps)
        if len(steps) < 2:
            return 0.0
        return sum(n for _, n in steps[1:]) / max(now - steps[0][0], 1e-3)
