"""HFEngine: a transformers model served with our own continuous-batching decode loop.

Why our own loop: on CPU, transformers' continuous batching is ~3× slower than one padded batch and
TextIteratorStreamer costs ~15 ms a token (FACTS.md). One worker thread owns the model; each
iteration applies cancels, runs one prefill forward, merges what it finished into the running batch
(node/scheduler.py), then runs one decode step for every running sequence. Sinks are called from
that thread.

Prefill: waiting requests are taken first come first served and prefilled together in one
left-padded forward while rows × longest prompt (padding included) fits `prefill_chunk` tokens; a
longer prompt is prefilled alone, `prefill_chunk` tokens per iteration. Either way running streams
wait at most one such forward between two decode steps. From transformers we use what `generate`
uses for a padded batch — a 2D attention mask and explicit position ids over a DynamicCache, and
`logits_to_keep=1` so the 49k-word LM head runs for each row's last token only — but not `generate`
itself, which cannot add rows to a batch that is already decoding.

Why group prefills: on the 2-core CPU a forward costs ~50 ms whatever its size (weight reads at
small batch) plus ~1 ms per prompt token, so 16 chat prompts of ~40 tokens cost ~1.4 s one by one
and ~0.7 s together. Why 128 tokens by default: such a forward (~170 ms, three chat prompts) already
pays the fixed cost off, costs about two decode steps of a full batch, and every row of a group waits
for the whole group — bigger groups delay the first rows and make requests finish in bigger
lockstep cohorts (docs/benchmarks.md). Why decode steps are not folded into the prefill forward (as
vLLM does): in a padded DynamicCache each decode row would gain a padding column per prefill token,
to save one ~50 ms fixed cost per prefill; batching alone met the engine's TTFT target.
A group's rows equal running alone up to numerical ties (padding changes the matmul shapes;
tests/test_engine.py checks that in float32).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from bus.errors import BadRequest, ContextLengthExceeded, NodeBusy
from bus.schemas import ChatMessage, ModelCard, SamplingParams, TokenLogprob, ToolSpec, TopLogprob
from node.engine import Delta, EngineRequest, EngineStats, FinishReason, Sink
from node.grammar import GrammarCompiler
from node.loader import LoadedModel
from node.prompting import render_chat
from node.sampling import Choice, TokenChooser, choose_tokens
from node.scheduler import KVBatch

T = TypeVar("T")

__all__ = ["HFEngine"]

log = logging.getLogger(__name__)

_TAIL = 4  # prompt tokens decoded with the output, so the first token keeps its leading space
_RATE_WINDOW_S = 5.0


class TextStream:
    """Generated ids → text deltas that never end in a partial UTF-8 char or a possible stop prefix."""

    def __init__(self, tokenizer: Any, prompt_tail: list[int], stops: list[str]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_tail)
        self._prefix = 0  # window start: decoding from a little earlier keeps spaces right
        self._read = len(self._ids)  # ids before this are already in `text`
        self._stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self._sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever was held back, minus an incomplete trailing character."""
        self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> None:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if final:
            after = after.rstrip("\ufffd")
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self._stops and not self.stopped:
            hits = [i for s in self._stops if (i := self.text.find(s, self._sent)) >= 0]
            if hits:
                end = min(hits)
                self.text, self.stopped = self.text[:end], True
            elif not final:
                end -= self._held(self.text[self._sent :])
        out, self._sent = self.text[self._sent : end], end
        return out

    def _held(self, tail: str) -> int:
        """Length of the longest suffix of `tail` that could still grow into a stop string."""
        for size in range(min(len(tail), max(map(len, self._stops)) - 1), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._stops):
                return size
        return 0


@dataclass(eq=False)
class _Seq:
    """One request's life inside the engine."""

    request: EngineRequest
    sink: Sink
    prompt: list[int]
    max_new: int
    chooser: TokenChooser
    stream: TextStream
    kv: KVBatch | None = None  # its own cache while a long prompt is prefilled chunk by chunk
    prefilled: int = 0
    next_token: int = -1
    completion: int = 0
    unsent_tokens: int = 0
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False


class HFEngine:
    """The Engine protocol (node/engine.py) over a LoadedModel, with continuous batching."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_running: int = 16,
        max_queued: int = 64,
        prefill_chunk: int = 128,
    ) -> None:
        self._m = loaded
        self._max_running = max_running
        self._max_queued = max_queued
        self._prefill_chunk = max(1, prefill_chunk)
        self._eos = set(loaded.eos_ids)
        self._vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
        self._grammars = GrammarCompiler.for_hf(loaded.tokenizer, self._vocab, loaded.eos_ids)
        self._cond = threading.Condition()
        self._queue: deque[_Seq] = deque()  # guarded by _cond
        self._cancels: set[str] = set()  # guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the worker thread only:
        self._prefilling: list[_Seq] = []  # out of the queue, not yet running (see _prefill_some)
        self._running: list[_Seq] = []
        self._batch = KVBatch(loaded.device)
        self._steps: deque[tuple[float, int]] = deque()
        # Other torch work (embeddings) runs on the worker thread too, between two steps: torch used
        # from a second thread of the process halves every later decode step on our 2-core CPU
        # (each thread gets its own OpenMP team; docs/benchmarks.md).
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # guarded by _cond

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
        return len(self._encode(messages, prompt, ""))

    def submit(self, request: EngineRequest, sink: Sink) -> int:
        _validate(request.params)
        ids = self._encode(request.messages, request.prompt, request.continuation, request.tools)
        room = self._m.context_length - len(ids)
        wanted = request.params.max_tokens
        if room < (wanted or 1):
            asked = f"max_tokens {wanted}" if wanted else "no room to generate"
            raise ContextLengthExceeded(
                f"prompt has {len(ids)} tokens, {asked}, model context is {self._m.context_length}"
            )
        seq = _Seq(
            request=request,
            sink=sink,
            prompt=ids,
            max_new=min(wanted or room, room),
            chooser=TokenChooser(
                request.params,
                ids,
                self._vocab,
                torch.device(self._m.device),
                grammar=self._grammars.row(request.constraint, request.continuation),
            ),
            stream=TextStream(self._m.tokenizer, ids[-_TAIL:], request.params.stop),
        )
        with self._cond:
            if self._stopping:
                raise NodeBusy("engine is shutting down")
            if len(self._queue) >= self._max_queued:
                raise NodeBusy(f"queue full ({self._max_queued} waiting)", retry_after_s=1.0)
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
        return EngineStats(running=running, queued=queued, tokens_per_s=self._rate())

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
        with torch.inference_mode():
            while self._wait_for_work():
                self._run_calls()
                try:
                    self._prefill_some()
                    self._decode_step()
                except Exception as exc:  # a failed forward fails the batch, never the node
                    log.exception("engine step failed")
                    self._fail_active(f"{type(exc).__name__}: {exc}")
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
        self._drop_finished()

    def _prefill_some(self) -> None:
        """One prefill forward: a group of whole prompts, or the next chunk of a long one."""
        if not self._prefilling:
            self._prefilling = self._take_group()
            if len(self._prefilling) == 1 and len(self._prefilling[0].prompt) > self._prefill_chunk:
                self._prefilling[0].kv = KVBatch(self._m.device)
        if not self._prefilling:
            return
        if self._prefilling[0].kv is not None:
            self._prefill_chunk_of(self._prefilling[0])
        else:
            self._prefill_group(self._prefilling)

    def _take_group(self) -> list[_Seq]:
        """Queued requests, first come first served, while their padded prompts fit `prefill_chunk`."""
        group: list[_Seq] = []
        longest = 0
        with self._cond:
            while self._queue and len(self._running) + len(group) < self._max_running:
                size = len(self._queue[0].prompt)
                if group and (len(group) + 1) * max(longest, size) > self._prefill_chunk:
                    break  # a prompt longer than the budget is taken alone, and chunked
                group.append(self._queue.popleft())
                longest = max(longest, size)
        return group

    def _prefill_group(self, group: list[_Seq]) -> None:
        """Whole prompts in one left-padded forward (the batch `generate` would build for them)."""
        longest = max(len(seq.prompt) for seq in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)  # pad id 0: masked, never attended
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, longest - len(seq.prompt) :] = torch.tensor(seq.prompt)
            mask[row, longest - len(seq.prompt) :] = 1
        kv = KVBatch(self._m.device)
        started = time.perf_counter()
        logits = kv.forward(self._m.model, ids.to(self._m.device), mask)
        log.debug(
            "prefill: %d rows × %d columns in %.1f ms",
            len(group),
            longest,
            1000 * (time.perf_counter() - started),
        )
        self._join(group, kv, logits)

    def _prefill_chunk_of(self, seq: _Seq) -> None:
        """The next `prefill_chunk` tokens of a long prompt, alone: running streams wait one chunk."""
        assert seq.kv is not None
        take = min(self._prefill_chunk, len(seq.prompt) - seq.prefilled)
        chunk = torch.tensor([seq.prompt[seq.prefilled : seq.prefilled + take]], device=self._m.device)
        logits = seq.kv.forward(self._m.model, chunk)
        seq.prefilled += take
        log.debug("prefill: 1 row, chunk of %d tokens (%d/%d)", take, seq.prefilled, len(seq.prompt))
        if seq.prefilled == len(seq.prompt):
            kv, seq.kv = seq.kv, None
            self._join([seq], kv, logits)

    def _join(self, seqs: list[_Seq], kv: KVBatch, logits: torch.Tensor) -> None:
        """First tokens from the prefill logits; the rows that go on join the running batch."""
        for seq, choice in zip(seqs, choose_tokens(logits, [s.chooser for s in seqs]), strict=True):
            seq.prefilled = len(seq.prompt)
            self._accept(seq, choice)
        keep = [row for row, seq in enumerate(seqs) if not seq.finished]
        kv.keep(keep)
        self._batch.merge(kv)
        self._running.extend(seqs[row] for row in keep)
        self._prefilling = []

    def _decode_step(self) -> None:
        if not self._running:
            return
        started = time.perf_counter()
        ids = torch.tensor([[s.next_token] for s in self._running], device=self._m.device)
        logits = self._batch.forward(self._m.model, ids)
        choices = choose_tokens(logits, [s.chooser for s in self._running])
        for seq, choice in zip(self._running, choices, strict=True):
            self._accept(seq, choice)
        self._steps.append((time.perf_counter(), len(choices)))
        log.debug("decode step: %d rows in %.1f ms", len(choices), 1000 * (time.perf_counter() - started))
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.finished]
        if len(keep) < len(self._running):
            self._batch.keep(keep)
            self._running = [self._running[i] for i in keep]

    # ------------------------------------------------------------------------- output

    def _accept(self, seq: _Seq, choice: Choice) -> None:
        """Account one generated token and tell the sink what became final."""
        seq.completion += 1
        seq.unsent_tokens += 1
        seq.next_token = choice.token
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
            self._send(seq, Delta(request_id=seq.request.request_id, text=text, **self._counts(seq)))

    def _finish(self, seq: _Seq, reason: FinishReason, text: str = "", error: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        delta = Delta(
            request_id=seq.request.request_id,
            text=text,
            finish_reason=reason,
            error=error,
            **self._counts(seq),
        )
        self._send(seq, delta)

    def _counts(self, seq: _Seq) -> dict[str, Any]:
        counts = {
            "tokens": seq.unsent_tokens,
            "prompt_tokens": len(seq.prompt),
            "completion_tokens": seq.completion,
            "logprobs": seq.unsent_logprobs or None,
        }
        seq.unsent_tokens, seq.unsent_logprobs = 0, []
        return counts

    def _send(self, seq: _Seq, delta: Delta) -> None:
        try:
            seq.sink(delta)
        except Exception:  # a broken sink loses its own request, never the batch
            log.exception("sink for %s failed; cancelling it", seq.request.request_id)
            seq.finished = True

    def _logprob(self, choice: Choice) -> TokenLogprob:
        decode = self._m.tokenizer.decode
        top = [TopLogprob(token=decode([t]), logprob=lp) for t, lp in choice.top]
        return TokenLogprob(token=decode([choice.token]), logprob=choice.logprob or 0.0, top=top)

    def _fail_active(self, error: str) -> None:
        for seq in [*self._running, *self._prefilling]:
            self._finish(seq, "error", error=error)
            seq.kv = None
        self._running, self._prefilling = [], []
        self._batch = KVBatch(self._m.device)

    def _finish_everything(self, reason: FinishReason) -> None:
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for seq in [*self._running, *self._prefilling, *queued]:
            self._finish(seq, reason)
            seq.kv = None
        self._running, self._prefilling = [], []
        self._batch = KVBatch(self._m.device)

    def _rate(self) -> float:
        now = time.perf_counter()
        while self._steps and now - self._steps[0][0] > _RATE_WINDOW_S:
            self._steps.popleft()
        steps = list(self._steps)
        if len(steps) < 2:
            return 0.0
        return sum(n for _, n in steps[1:]) / max(now - steps[0][0], 1e-3)

    # ------------------------------------------------------------------------- prompts

    def _encode(
        self,
        messages: list[ChatMessage] | None,
        prompt: str | None,
        continuation: str,
        tools: list[ToolSpec] | None = None,
    ) -> list[int]:
        """Token ids exactly as they will be prefilled (chat template, then any continuation)."""
        tok = self._m.tokenizer
        if (messages is None) == (prompt is None):
            raise BadRequest("pass exactly one of messages (chat) or prompt (completion)")
        if messages is not None:
            if not messages:
                raise BadRequest("messages is empty")
            text = render_chat(tok, messages, tools) + continuation
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok((prompt or "") + continuation)["input_ids"]
        if not ids:
            raise BadRequest("prompt is empty")
        return list(ids)


def _validate(p: SamplingParams) -> None:
    for problem in p.problems()[:1]:
        raise BadRequest(problem)
