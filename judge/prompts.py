"""Judge prompts as data (judge/data/judge_prompts.jsonl): pick one for a question, fill it in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

__all__ = ["JudgePrompt", "load_prompts", "pick_prompt"]


class JudgePrompt(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: Literal["single", "pairwise"]
    multi_turn: bool
    reference: bool
    system_prompt: str
    prompt_template: str
    output_format: str
    description: str = ""

    def render(self, **fields: str) -> tuple[str, str]:
        """(system, user) messages; a missing field is a bug in the caller, so it raises KeyError."""
        return self.system_prompt, self.prompt_template.format(**fields)


def _default_path() -> Path:
    return Path(__file__).resolve().parent / "data" / "judge_prompts.jsonl"


def load_prompts(path: Path | None = None) -> dict[str, JudgePrompt]:
    path = path or _default_path()
    prompts = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = msgspec.json.decode(line, type=JudgePrompt)
            prompts[p.name] = p
    return prompts


def pick_prompt(
    prompts: dict[str, JudgePrompt], kind: Literal["single", "pairwise"], multi_turn: bool, reference: bool
) -> JudgePrompt:
    for p in prompts.values():
        if p.type == kind and p.multi_turn == multi_turn and p.reference == reference:
            return p
    raise KeyError(f"no {kind} judge prompt with multi_turn={multi_turn} reference={reference}")
