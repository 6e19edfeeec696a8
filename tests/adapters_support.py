"""PEFT LoRA dirs for the adapter tests: seeded, with a nonzero B so they change the base's answers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch


def make_adapter(
    model: Any,
    out: Path,
    seed: int,
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj"),
    rank: int = 8,
    alpha: int = 0,
    base: str = "default",
    name: str | None = None,
    **config: Any,
) -> Any:
    """Save a LoRA of `model` (untouched: a copy gets the adapter) into `out`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter changes the answers from step one.
    lora = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), init_lora_weights=False, **config
    )
    peft_model = get_peft_model(copy.deepcopy(model), lora).eval()
    peft_model.save_pretrained(out)
    info = {"name": name or out.name, "base": base, "method": "lora", "job_id": ""}
    (out / "chatbus.json").write_text(json.dumps(info))
    return peft_model


def tiny_llama_adapter(out: Path) -> None:
    """A LoRA of another (tiny, random) Llama: its shapes fit nothing the default model has."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(out)
