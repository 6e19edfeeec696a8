"""`chatbus data clean|split-long|convert-alpaca|stats`: the dataset chores FastChat users rely on.

Inputs are JSON lists or JSON lines in either supported format; outputs are ShareGPT JSON lines.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.data import DatasetError, normalize, parse_records

__all__ = ["add_data_commands", "clean", "convert_alpaca", "html_to_markdown", "split_long", "to_sharegpt"]

_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
_TAGS: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"<br\s*/?>", re.I), "\n"),
    (re.compile(r"</p\s*>", re.I), "\n\n"),
    (re.compile(r"<(strong|b)>(.*?)</\1>", re.I | re.S), r"**\2**"),
    (re.compile(r"<(em|i)>(.*?)</\1>", re.I | re.S), r"*\2*"),
    (re.compile(r"<pre[^>]*>\s*<code[^>]*>(.*?)</code>\s*</pre>", re.I | re.S), "\n```\n\\1\n```\n"),
    (re.compile(r"<code[^>]*>(.*?)</code>", re.I | re.S), r"`\1`"),
    (re.compile(r"<a [^>]*href=\"([^\"]*)\"[^>]*>(.*?)</a>", re.I | re.S), r"[\2](\1)"),
    (re.compile(r"<li[^>]*>", re.I), "- "),
    (re.compile(r"<h([1-6])[^>]*>(.*?)</h\1>", re.I | re.S), lambda m: "#" * int(m[1]) + " " + m[2] + "\n"),
]
_ANY_TAG = re.compile(r"</?[a-zA-Z][^>]*>")


def html_to_markdown(text: str) -> str:
    """ShareGPT scrapes are HTML: keep the structure as Markdown, drop the rest of the tags."""
    if "<" not in text:
        return text
    for pattern, repl in _TAGS:
        text = pattern.sub(repl, text)
    text = html.unescape(_ANY_TAG.sub("", text))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def to_sharegpt(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"conversations": [{"from": _FROM[m["role"]], "value": m["content"]} for m in messages]}


def clean(data: bytes, name: str) -> tuple[list[dict[str, Any]], Counter[str]]:
    """HTML → Markdown, malformed records and broken alternation dropped, exact duplicates removed."""
    conversations, bad = parse_records(data, name)
    dropped: Counter[str] = Counter({"malformed": len(bad)} if bad else {})
    seen: set[str] = set()
    out = []
    for conv in conversations:
        messages = [{**m, "content": html_to_markdown(m["content"])} for m in conv.messages]
        try:
            messages = normalize(messages)
        except ValueError as e:
            dropped[str(e)] += 1
            continue
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        if digest in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(digest)
        out.append(to_sharegpt(messages))
    return out, dropped


def convert_alpaca(data: bytes) -> list[dict[str, Any]]:
    """Alpaca `{instruction, input, output}` records (JSON list or lines) → one-turn conversations."""
    text = data.decode("utf-8-sig")
    records = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    out = []
    for i, r in enumerate(records, 1):
        if (
            not isinstance(r, dict)
            or not isinstance(r.get("instruction"), str)
            or not isinstance(r.get("output"), str)
        ):
            raise DatasetError(f"record {i} is not an alpaca record (needs instruction and output strings)")
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append(
            to_sharegpt([{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}])
        )
    return out


def split_long(
    data: bytes, name: str, count: Callable[[list[dict[str, str]]], int], max_tokens: int
) -> list[dict[str, Any]]:
    """FastChat's split_long_conversation: cut between user/assistant pairs so each piece fits `max_tokens`."""
    conversations, bad = parse_records(data, name)
    if bad:
        raise DatasetError(
            f"{name}: {len(bad)} malformed record(s), first: {bad[0]}; run `chatbus data clean` first"
        )
    out = []
    for conv in conversations:
        try:
            messages = normalize(conv.messages)
        except ValueError:
            continue
        system = messages[:1] if messages[0]["role"] == "system" else []
        pairs = [messages[i : i + 2] for i in range(len(system), len(messages), 2)]
        piece: list[dict[str, str]] = []
        for pair in pairs:
            if piece and count(system + piece + pair) > max_tokens:
                out.append(to_sharegpt(system + piece))
                piece = []
            piece += pair
        if piece:
            out.append(to_sharegpt(system + piece))
    return out


def stats(data: bytes, name: str, count: Callable[[list[dict[str, str]]], int] | None) -> str:
    conversations, bad = parse_records(data, name)
    turns = [len(c.messages) for c in conversations]
    roles = Counter(m["role"] for c in conversations for m in c.messages)
    lines = [
        f"{name}: {len(conversations)} conversations, {len(bad)} malformed records",
        f"turns: {sum(turns)} (mean {sum(turns) / max(1, len(turns)):.1f}, max {max(turns, default=0)}); roles {dict(roles)}",
    ]
    if count is not None and conversations:
        lengths = sorted(count(c.messages) for c in conversations)
        pct = {p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (50, 90, 99)}
        lines.append(
            f"tokens (chat template): total {sum(lengths)}, p50 {pct[50]}, p90 {pct[90]}, p99 {pct[99]}, max {lengths[-1]}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _token_counter(base: str, cache_dir: Path | None) -> Callable[[list[dict[str, str]]], int]:
    from transformers import AutoTokenizer

    from trainer.__main__ import default_cache_dir
    from trainer.model import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base, cache_dir or default_cache_dir()))

    def count(messages: list[dict[str, str]]) -> int:
        encoded: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return len(encoded["input_ids"])

    return count


def _write(rows: list[dict[str, Any]], out: Path) -> None:
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _run(args: argparse.Namespace) -> int:
    data = args.input.read_bytes()
    try:
        if args.data_command == "stats":
            count = _token_counter(args.base, args.cache_dir) if args.tokens else None
            print(stats(data, args.input.name, count))
            return 0
        if args.data_command == "clean":
            rows, dropped = clean(data, args.input.name)
            print(f"kept {len(rows)}; dropped {sum(dropped.values())} {dict(dropped)}")
        elif args.data_command == "convert-alpaca":
            rows = convert_alpaca(data)
            print(f"converted {len(rows)} records")
        else:
            count = _token_counter(args.base, args.cache_dir)
            rows = split_long(data, args.input.name, count, args.max_tokens)
            print(f"{len(rows)} conversations after splitting at {args.max_tokens} tokens")
    except (DatasetError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _write(rows, args.output)
    return 0


def add_data_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    data = sub.add_parser("data", help="dataset tools: clean, split-long, convert-alpaca, stats")
    dsub = data.add_subparsers(dest="data_command", required=True)
    for name, text in (
        ("clean", "HTML to Markdown, drop malformed alternation, dedup"),
        ("split-long", "split conversations longer than --max-tokens"),
        ("convert-alpaca", "alpaca instruction/input/output → ShareGPT"),
        ("stats", "counts, roles, token lengths"),
    ):
        p = dsub.add_parser(name, help=text)
        common(p)
        p.add_argument("input", type=Path)
        if name != "stats":
            p.add_argument("output", type=Path)
        if name in ("split-long", "stats"):
            p.add_argument("--base", default="default", help="whose tokenizer counts tokens")
            p.add_argument("--cache-dir", type=Path, default=None)
        if name == "split-long":
            p.add_argument("--max-tokens", type=int, required=True)
        if name == "stats":
            p.add_argument("--tokens", action="store_true", help="also count tokens (loads the tokenizer)")
        p.set_defaults(func=lambda args, url: _run(args))
