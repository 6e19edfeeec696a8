"""Choosing the next token per sequence: penalties, logit bias, grammar, temperature, top-k/top-p, seeds.

Rows that are plain greedy share one batched argmax; every other row is processed on its own (its own
torch.Generator, so a seeded request gives the same text whatever else is in the batch). Rows with a
grammar (node/grammar.py) are masked first, all in one batched op (masking commutes with penalties
and bias: -inf stays -inf), then chosen like any row, and advance their grammar after; a batch
without constrained rows pays nothing for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from bus.schemas import SamplingParams
from node.grammar import RowGrammar, mask_rows

__all__ = ["Choice", "TokenChooser", "choose_tokens"]


@dataclass
class Choice:
    token: int
    logprob: float | None = None  # set only when the request asked for logprobs
    top: list[tuple[int, float]] = field(default_factory=list)


class TokenChooser:
    """Per-request sampling state: parameters, RNG and the token counts the penalties need."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        device: torch.device,
        grammar: RowGrammar | None = None,
    ):
        self.params = params
        self.grammar = grammar
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < vocab_size and b}
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long, device=device)
            self.bias = ids, torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
        self.greedy = params.temperature <= 0 or params.top_k == 1
        self.want_logprobs = params.logprobs or params.top_logprobs > 0
        self.penalised = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator.manual_seed(seed)
        self.counts: torch.Tensor | None = None  # generated-token counts (presence/frequency)
        self.seen: torch.Tensor | None = None  # prompt ∪ generated (repetition penalty, HF semantics)
        if self.penalised:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device).clamp(max=vocab_size - 1)] = True

    @property
    def fast(self) -> bool:
        """True when a batched argmax is the whole job."""
        return self.greedy and not self.penalised and not self.want_logprobs and self.bias is None

    def observe(self, token: int) -> None:
        if self.grammar is not None:
            self.grammar.advance(token)
        if self.counts is not None and self.seen is not None and token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True

    def choose(self, logits: torch.Tensor, masked: bool = False) -> Choice:
        """Pick a token from one row of float32 logits [vocab] (`masked`: the grammar mask is applied)."""
        p = self.params
        if self.penalised:
            logits = self._penalise(logits)
        if self.bias is not None:
            logits = logits.index_add(0, self.bias[0], self.bias[1].to(logits.dtype))
        if self.grammar is not None and not masked:
            logits = self.grammar.mask(logits)
        if self.greedy:
            token = int(logits.argmax())
        else:
            token = self._sample(logits)
        choice = Choice(token)
        if self.want_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1)
            choice.logprob = float(logprobs[token])
            if p.top_logprobs > 0:
                values, ids = logprobs.topk(p.top_logprobs)
                choice.top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return choice

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        assert self.counts is not None and self.seen is not None
        logits = logits.clone()
        if p.repetition_penalty != 1.0:
            hit = logits[self.seen]
            logits[self.seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
        if p.frequency_penalty:
            logits -= p.frequency_penalty * self.counts
        if p.presence_penalty:
            logits -= p.presence_penalty * (self.counts > 0).float()
        return logits

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.params
        scaled = logits / p.temperature
        if p.top_k > 0 and p.top_k < scaled.shape[-1]:
            kth = scaled.topk(p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = scaled.sort(descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            scaled = scaled.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        probs = scaled.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, choosers: list[TokenChooser]) -> list[Choice]:
    """One Choice per row of `logits` [rows, vocab]; greedy rows share one argmax.

    Constrained rows of `logits` are masked in place (the caller's step owns the tensor).
    """
    constrained = [row for row, c in enumerate(choosers) if c.grammar is not None]
    mask_rows(logits, constrained, [choosers[row].grammar for row in constrained])  # type: ignore[misc]
    fast = logits.argmax(dim=-1).tolist() if any(c.fast for c in choosers) else []
    choices = []
    for row, chooser in enumerate(choosers):
        choice = Choice(fast[row]) if chooser.fast else chooser.choose(logits[row], masked=True)
        chooser.observe(choice.token)
        choices.append(choice)
    return choices
