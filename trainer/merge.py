"""Merge a LoRA adapter into its base model's weights (FastChat's apply_lora), for serving without peft."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.model import resolve_base

__all__ = ["merge_adapter"]


def merge_adapter(adapter_dir: Path, base: str, cache_dir: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base(base, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
    return out
