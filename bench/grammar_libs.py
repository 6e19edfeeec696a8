"""Per-step token-mask cost of llguidance vs xgrammar with this engine's tokenizer and logits.

Run: python bench/grammar_libs.py [--model-dir DIR] [--steps 300]
(xgrammar is not a chatbus dependency: `pip install --target /tmp/xg --no-deps xgrammar apache-tvm-ffi`
then PYTHONPATH=/tmp/xg; the row is skipped when it cannot be imported.)

For each library: tokenizer info build time, compile time of a JSON schema, then a decode of a valid
document, teacher-forced token by token: per step, fill the row's mask, apply it to a float32 logits
row [vocab], advance the matcher with the document's next token (a finished document restarts).
Reported: µs per step for each part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "cat", "dog"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "score"],
}
DOCUMENT = (
    '{"name": "Ada Lovelace", "age": 36, "tags": ["cat", "a", "dog"], '
    '"address": {"city": "London", "zip": "12345"}, "score": 9.75}'
)


def _llguidance(tok, vocab: int, eos: int):  # type: ignore[no-untyped-def]
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    mask = lt.allocate_token_bitmask(1, vocab)

    def fill() -> None:
        lt.fill_next_token_bitmask(matcher, mask, 0)

    def advance(token: int) -> bool:
        assert matcher.consume_token(token), matcher.get_error()
        return False

    def restart() -> None:
        matcher.reset()

    return t1 - t0, t2 - t1, mask, fill, advance, restart


def _xgrammar(tok, vocab: int, eos: int):  # type: ignore[no-untyped-def]
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    t2 = time.perf_counter()
    mask = xgr.allocate_token_bitmask(1, vocab)

    def fill() -> None:
        matcher.fill_next_token_bitmask(mask, 0)

    def advance(token: int) -> bool:
        assert matcher.accept_token(token)
        return False

    def restart() -> None:
        matcher.reset()

    return t1 - t0, t2 - t1, mask, fill, advance, restart


def _apply(logits: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor) -> None:
    allowed = (mask[0].unsqueeze(-1) & bits).ne(0).view(-1)[: logits.shape[0]]
    logits.masked_fill_(~allowed, float("-inf"))


def run(name: str, setup, tok, vocab: int, eos: int, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    info_s, compile_s, mask, fill, advance, restart = setup(tok, vocab, eos)
    bits = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)
    gen = torch.Generator().manual_seed(0)
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    fills, applies, advances, docs = [], [], [], 0
    for step in range(steps):
        if step and step % len(ids) == 0:
            restart()
            docs += 1
        token = ids[step % len(ids)]
        logits = torch.randn(vocab, generator=gen)
        a = time.perf_counter()
        fill()
        b = time.perf_counter()
        _apply(logits, mask, bits)
        assert logits[token] > float("-inf"), "the mask forbids the document's next token"
        c = time.perf_counter()
        advance(token)
        d = time.perf_counter()
        fills.append(b - a)
        applies.append(c - b)
        advances.append(d - c)
    us = 1e6
    return {
        "library": name,  # type: ignore[dict-item]
        "tokenizer info ms": 1000 * info_s,
        "compile ms": 1000 * compile_s,
        "fill µs p50": us * statistics.median(fills),
        "fill µs mean": us * statistics.fmean(fills),
        "apply µs p50": us * statistics.median(applies),
        "advance µs p50": us * statistics.median(advances),
        "docs": docs,
    }


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/chatbus-test/SmolLM2-135M-Instruct"))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    vocab, eos = 49152, int(tok.eos_token_id)
    rows = [run("llguidance", _llguidance, tok, vocab, eos, args.steps)]
    try:
        rows.append(run("xgrammar", _xgrammar, tok, vocab, eos, args.steps))
    except ImportError as e:
        print(f"xgrammar skipped: {e}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
