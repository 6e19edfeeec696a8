"""Constrained decoding for any engine: a compiled grammar per row masks its logits and follows its tokens.

Engine-agnostic: a row takes one torch logits row [vocab] and the token that was chosen; it knows
nothing of batching, KV caches or NATS. The library is llguidance (bench/grammar_libs.py and
docs/benchmarks.md say why: no torch dependency, so the gateway compiles the very same grammar to
reject bad schemas early, and a mask costs tens of µs against a ~50 ms decode step).

Per model, a `GrammarCompiler` builds llguidance's tokenizer view once (~0.5 s, in the background) and
keeps one matcher per compiled grammar; each row gets a cheap deep copy of it. Once a grammar is
complete the mask allows only the end-of-sequence tokens, so the engine finishes the row with
"stop" through its ordinary EOS path.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llguidance
import torch

from bus.constraints import compile_grammar
from bus.errors import BadRequest
from bus.schemas import Constraint

__all__ = ["GrammarCompiler", "RowGrammar", "mask_rows"]

log = logging.getLogger(__name__)

_CACHED_GRAMMARS = 64
# Bit i of a 32-bit mask word as an int32 (bit 31 is the sign bit).
_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)


class RowGrammar:
    """One sequence's grammar state: `mask()` the logits before choosing, `advance()` after."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._eos = eos_ids
        self._words = (vocab_size + 31) // 32
        self._buf: torch.Tensor | None = None  # made on first use, on the engine's thread

    @property
    def done(self) -> bool:
        """True once nothing but end-of-sequence may follow."""
        return bool(self._matcher.is_stopped())

    def fill(self, words: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 [ceil(vocab / 32)], contiguous, CPU) into `words`."""
        if self._matcher.is_error():  # only EOS, so the row ends
            words.zero_()
            for token in self._eos:
                words[token // 32] |= _BITS[token % 32]
            return
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), self._words * 4)

    def allowed(self) -> torch.Tensor:
        """Bool [vocab] of the tokens the grammar allows next (only EOS once done or broken)."""
        if self._buf is None:
            self._buf = torch.zeros(self._words, dtype=torch.int32)
        self.fill(self._buf)
        return _unpack(self._buf.unsqueeze(0), self._vocab)[0]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [vocab] with every token the grammar forbids set to -inf (a new tensor)."""
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token) and token not in self._eos:
            log.warning("grammar rejected token %d: %s", token, self._matcher.get_error())


def _unpack(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmasks [rows, words] → bool [rows, vocab]."""
    return (words.unsqueeze(-1) & _BITS).ne(0).view(words.shape[0], -1)[:, :vocab]


def mask_rows(logits: torch.Tensor, rows: list[int], grammars: list[RowGrammar]) -> None:
    """Mask rows `rows` of `logits` [batch, vocab] in place, each by its grammar, in one batched op.

    One bitmask buffer, one unpack and one masked write for every constrained row of a step: per-row
    torch ops cost more than the grammar itself.
    """
    if not rows:
        return
    vocab = logits.shape[-1]
    words = torch.empty(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for k, grammar in enumerate(grammars):
        grammar.fill(words[k])
    index = torch.tensor(rows, device=logits.device)
    allowed = _unpack(words, vocab).to(logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


class GrammarCompiler:
    """Compiled grammars for one model's tokenizer; thread-safe (submit() runs on callers' threads)."""

    def __init__(self, make_tokenizer: Callable[[], Any], vocab_size: int, eos_ids: list[int]) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self._vocab = vocab_size
        self._eos = list(eos_ids)
        self._lock = threading.Lock()
        self._matchers: OrderedDict[str, Any] = OrderedDict()  # grammar text → a fresh matcher

    @classmethod
    def for_hf(cls, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> GrammarCompiler:
        """For a Hugging Face fast tokenizer (the llguidance view is built on first use)."""

        eos = list(eos_ids) or [int(tokenizer.eos_token_id)]  # a bench may run with EOS disabled

        def make() -> Any:
            import llguidance.hf

            return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)

        compiler = cls(make, vocab_size, eos)
        # Built in the background (no torch in it), so the first constrained request does not wait
        # ~0.5 s on the node's event loop.
        threading.Thread(target=compiler.warm, name="grammar-tokenizer", daemon=True).start()
        return compiler

    def warm(self) -> None:
        """Build the tokenizer view now (otherwise the first row() does)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()

    def row(self, constraint: Constraint | None, continuation: str = "") -> RowGrammar | None:
        """A fresh RowGrammar for `constraint` (None for none), past `continuation` if any.

        Raises BadRequest (Unsupported for an unknown kind or version) before any decoding.
        """
        if constraint is None:
            return None
        grammar = compile_grammar(constraint)
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            template = self._matchers.get(grammar)
            if template is None:
                template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
                if template.is_error():
                    raise BadRequest(f"the {constraint.kind} cannot be used: {template.get_error()}")
                self._matchers[grammar] = template
                if len(self._matchers) > _CACHED_GRAMMARS:
                    self._matchers.popitem(last=False)
            else:
                self._matchers.move_to_end(grammar)
            matcher = template.deep_copy()
            if continuation:  # failover: the text another node already produced
                matcher.consume_tokens(self._tokenizer.tokenize_str(continuation))
        return RowGrammar(matcher, self._vocab, self._eos)
