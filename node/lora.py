"""Per-row LoRA: one base model serves many PEFT LoRA adapters, rows of one batch each with their own.

peft's own layers pick the adapter per forward (or, with `adapter_names`, loop over the adapters of a
batch, a handful of small ops per adapter per linear). Here each LoRA target linear of the base is
wrapped once (`LoraLinear`), and every adapter's factors live in one stack per module: A of all
adapters as one [sum of ranks, in] matrix, scale·B transposed as one [sum of ranks, out]. A forward
with adapter rows costs two matmuls and a mask per wrapped linear, however many adapters the batch
mixes: `base(x) + ((x @ A^T) * mask) @ (sB)^T`, where row r's mask keeps only its adapter's rank
columns (a base row's is all zero, so it gets its base output exactly). Only the slice of the stack
the batch's adapters span is used, and a batch with no adapter row skips the path entirely.

Adapter weights are read with peft's own loader and config (`load_peft_weights`, `LoraConfig`, its
rank/alpha patterns); what cannot be applied per row (DoRA, trained biases, modules_to_save, LoRA on
embeddings) is refused with a message. Loading, unloading and every forward run on the engine's
worker thread; `acquire`/`release` (a request's hold on its adapter) may come from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from bus.errors import BadRequest, ModelNotFound, NodeBusy
from bus.schemas import ModelCard

__all__ = ["Adapter", "AdapterSet", "LoraBank", "LoraLinear", "base_of", "same_base"]

T = TypeVar("T")
DEFAULT_BASE = "SmolLM2-135M-Instruct"  # node.loader.DEFAULT_MODEL (not imported: no transformers here)


def base_of(name: str) -> str:
    """A model as `--model`, `--base` or a PEFT config name it: 'default', a local dir or a hub id,
    reduced to the name the node serves it under (the loader's rule)."""
    if name in ("", "default"):
        return DEFAULT_BASE
    return name.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def same_base(a: str, b: str) -> bool:
    return base_of(a).lower() == base_of(b).lower()


@dataclass(eq=False)
class Adapter:
    """One loaded LoRA: its factors per module, and who uses it."""

    name: str
    base: str  # as the adapter names it
    source: str  # where it came from (a job id, an artifact, a dir)
    rank: int  # every module padded to this rank (zeros: exact)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [rank, in], (scale·B)^T [rank, out])
    salt: int  # unique per load: keys the prefix cache (the same tokens have other KV under it)
    users: int = 0  # requests queued or running with it
    unloading: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)


class LoraLinear(torch.nn.Module):
    """A base linear (nn.Linear or node.packing.PackedLinear) plus the bank's per-row LoRA term."""

    def __init__(self, base: Any, bank: LoraBank, name: str) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self._bank = [bank]  # a list: not a submodule
        self.name = name

    @property
    def weight(self) -> torch.Tensor:  # readers of .weight (dtype, device, shape) see the base's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bank = self._bank[0]
        if bank.mask is None:
            return out
        pair = bank.stack.get(self.name)
        if pair is None:
            return out
        lo, hi = bank.span
        a, bt = pair
        low = F.linear(x, a[lo:hi]) * bank.mask
        return out + torch.matmul(low, bt[lo:hi])


class LoraBank:
    """The wrapped linears of one model and the stacked factors of every loaded adapter."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.wrapped: dict[str, LoraLinear] = {}
        self.order: list[Adapter] = []  # stack order
        self.offsets: dict[int, int] = {}  # adapter salt -> first rank column in the stack
        self.stack: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None  # [rows, 1, hi - lo] while a forward with adapter rows runs
        self.span = (0, 0)
        weight = model.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device

    def linears(self) -> dict[str, Any]:
        """Module name -> the base linear (wrapped or not) a LoRA may target."""
        out: dict[str, Any] = {name: w.base for name, w in self.wrapped.items()}
        for name, module in self.model.named_modules():
            if name not in out and not isinstance(module, LoraLinear) and hasattr(module, "in_features"):
                if not any(part == "base" for part in name.split(".")):
                    out[name] = module
        return out

    def wrap(self, names: list[str]) -> None:
        for name in names:
            if name in self.wrapped:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            wrapper = LoraLinear(getattr(parent, child), self, name)
            setattr(parent, child, wrapper)
            self.wrapped[name] = wrapper

    def rebuild(self, adapters: list[Adapter]) -> None:
        """Stack these adapters' factors (an adapter that skips a module gets zeros there)."""
        self.order = list(adapters)
        self.offsets, total = {}, 0
        for adapter in self.order:
            self.offsets[adapter.salt] = total
            total += adapter.rank
        stack: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, wrapper in self.wrapped.items():
            if not any(name in a.factors for a in self.order):
                continue
            a_parts, b_parts = [], []
            size_in, size_out = int(wrapper.in_features), int(wrapper.out_features)
            for adapter in self.order:
                pair = adapter.factors.get(name)
                if pair is None:
                    pair = (
                        torch.zeros(adapter.rank, size_in, dtype=self.dtype, device=self.device),
                        torch.zeros(adapter.rank, size_out, dtype=self.dtype, device=self.device),
                    )
                a_parts.append(pair[0])
                b_parts.append(pair[1])
            stack[name] = (torch.cat(a_parts).contiguous(), torch.cat(b_parts).contiguous())
        self.stack = stack

    @contextlib.contextmanager
    def rows(self, adapters: list[Adapter | None]) -> Iterator[None]:
        """During the block, row r of a forward gets adapters[r]'s LoRA (None: the base alone)."""
        used = [a for a in adapters if a is not None]
        if not used:
            yield
            return
        starts = [self.offsets[a.salt] for a in used]
        lo, hi = min(starts), max(s + a.rank for s, a in zip(starts, used, strict=True))
        mask = torch.zeros(len(adapters), 1, hi - lo, dtype=self.dtype, device=self.device)
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                start = self.offsets[adapter.salt] - lo
                mask[row, 0, start : start + adapter.rank] = 1
        self.mask, self.span = mask, (lo, hi)
        try:
            yield
        finally:
            self.mask = None


def read_adapter(
    path: Path, linears: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> tuple[int, str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(rank, base named in its config, factors per module of `linears`) of the PEFT LoRA dir `path`."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    if not (path / "adapter_config.json").is_file():
        raise BadRequest(f"{path} is not a PEFT adapter dir (no adapter_config.json)")
    config = LoraConfig.from_pretrained(str(path))
    problems = [
        what
        for what, bad in (
            ("DoRA (use_dora)", getattr(config, "use_dora", False)),
            (f"trained biases (bias={config.bias!r})", config.bias != "none"),
            ("lora_bias", getattr(config, "lora_bias", False)),
            ("modules_to_save", bool(config.modules_to_save)),
            ("fan_in_fan_out", getattr(config, "fan_in_fan_out", False)),
        )
        if bad
    ]
    if problems:
        raise BadRequest(f"{path.name}: per-row serving supports plain LoRA only, not {', '.join(problems)}")
    state = load_peft_weights(str(path), device="cpu")
    raw: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, dot, kind = key.rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight"):
            raise BadRequest(f"{path.name}: cannot serve weight {key!r} per row (only linear lora_A/lora_B)")
        name = module.removeprefix("base_model.model.")
        raw.setdefault(name, {})[kind[0]] = tensor
    rank = max((parts["A"].shape[0] for parts in raw.values()), default=0)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, parts in raw.items():
        linear = linears.get(name)
        a, b = parts.get("A"), parts.get("B")
        if linear is None or a is None or b is None:
            raise ValueError(f"module {name!r} is not a linear of this model")
        if tuple(a.shape[1:]) != (linear.in_features,) or b.shape[0] != linear.out_features:
            raise ValueError(
                f"{name}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                f"[{linear.out_features} x {linear.in_features}]"
            )
        r = a.shape[0]
        patterns = config.alpha_pattern or {}  # None in some peft versions
        alpha = (
            patterns.get(get_pattern_key(list(patterns), name), config.lora_alpha)
            if patterns
            else config.lora_alpha
        )
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        a_full = torch.zeros(rank, a.shape[1], dtype=torch.float32)
        bt_full = torch.zeros(rank, b.shape[0], dtype=torch.float32)
        a_full[:r] = a.float()
        bt_full[:r] = (b.float() * scale).T
        factors[name] = (a_full.to(device, dtype).contiguous(), bt_full.to(device, dtype).contiguous())
    if not factors:
        raise BadRequest(f"{path.name}: the adapter holds no LoRA weights")
    return rank, str(config.base_model_name_or_path or ""), factors


class AdapterSet:
    """The adapters an engine serves beside its base: load, unload, least recently used eviction."""

    def __init__(
        self,
        model: Any,
        base: str,
        context_length: int,
        on_worker: Callable[[Callable[[], T]], T],
        max_adapters: int = 8,
    ) -> None:
        self.base = base  # the model adapters must be trained on (node/main.py sets it past --name)
        self.parent = base  # the name the base is served under: what an adapter's card names
        self.max_adapters = max_adapters
        self._model = model
        self._context_length = context_length
        self._on_worker: Callable[[Callable[[], Any]], Any] = on_worker
        self._bank: LoraBank | None = None  # made on the first load: a base-only node wraps nothing
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}  # guarded by _lock
        self._salts = itertools.count(1)

    def cards(self) -> list[ModelCard]:
        with self._lock:
            live = [a for a in self._by_name.values() if not a.unloading]
        return [ModelCard(name=a.name, context_length=self._context_length, base=self.parent) for a in live]

    def fits(self, base: str) -> bool:
        """Is an adapter trained on `base` one for this node's base?"""
        return same_base(base, self.base)

    def names(self) -> list[str]:
        return [c.name for c in self.cards()]

    def acquire(self, name: str) -> Adapter:
        """A request's hold on adapter `name` (until `release`)."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None or adapter.unloading:
                served = [self.parent, *(n for n, a in self._by_name.items() if not a.unloading)]
                raise ModelNotFound(name, served)
            adapter.users += 1
            adapter.last_used = time.monotonic()
            return adapter

    def release(self, adapter: Adapter) -> None:
        """From the worker thread: the request is over; an unloading adapter goes with its last user."""
        with self._lock:
            adapter.users -= 1
            gone = adapter.unloading and adapter.users <= 0 and self._by_name.get(adapter.name) is adapter
            if gone:
                del self._by_name[adapter.name]
        if gone:
            self._restack()

    def rows(self, adapters: list[Adapter | None]) -> contextlib.AbstractContextManager[None]:
        if self._bank is None:
            return contextlib.nullcontext()
        return self._bank.rows(adapters)

    def load(self, path: Path, name: str, source: str = "", base: str = "") -> ModelCard:
        """Read the PEFT dir `path` and serve it as `name` (replacing a loaded one of that name)."""
        card: ModelCard = self._on_worker(lambda: self._load(Path(path), name, source or str(path), base))
        return card

    def unload(self, name: str) -> int:
        """Stop serving `name` now; its running requests finish first. Returns how many still run."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None or adapter.unloading:
                raise ModelNotFound(name, [self.parent, *self.names()])
            adapter.unloading = True
            running = adapter.users
            if not running:
                del self._by_name[name]
        if not running:
            self._on_worker(self._restack)
        return running

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            adapters = list(self._by_name.values())
        now = time.monotonic()
        return [
            {
                "name": a.name,
                "base": self.parent,
                "source": a.source,
                "rank": a.rank,
                "mib": round(a.nbytes / 2**20, 1),
                "running": a.users,
                "idle_s": round(now - a.last_used, 1),
                "unloading": a.unloading,
            }
            for a in adapters
        ]

    def _load(self, path: Path, name: str, source: str, base: str) -> ModelCard:
        info = _chatbus_json(path)
        claimed = base or info.get("base") or ""
        if claimed and not same_base(claimed, self.base):
            raise BadRequest(
                f"adapter {name!r} was trained on {base_of(claimed)!r}; this node serves {self.base!r}: "
                f"load it on a node of {base_of(claimed)!r}"
            )
        if self._bank is None:
            self._bank = LoraBank(self._model)
        bank = self._bank
        try:
            rank, named, factors = read_adapter(path, bank.linears(), bank.dtype, bank.device)
        except ValueError as e:
            what = base_of(claimed) if claimed else "another model"
            raise BadRequest(f"adapter {name!r} does not fit {self.base!r} (it is for {what}): {e}") from None
        if not claimed and named and not same_base(named, self.base):
            raise BadRequest(
                f"adapter {name!r} was trained on {base_of(named)!r}; this node serves {self.base!r}"
            )
        with self._lock:
            old = self._by_name.get(name)
            if old is not None and old.users:
                raise NodeBusy(f"adapter {name!r} is loaded and in use: unload it first", 1.0)
            idle = sorted(
                (a for a in self._by_name.values() if a is not old and a.users == 0),
                key=lambda a: a.last_used,
            )
            live = len(self._by_name) - (old is not None)
            if live >= self.max_adapters and not idle:
                raise NodeBusy(
                    f"{live} adapters loaded (--max-adapters {self.max_adapters}), all in use", 5.0
                )
            for evicted in idle[: max(0, live - self.max_adapters + 1)]:
                del self._by_name[evicted.name]
            adapter = Adapter(name, claimed or named, source, rank, factors, next(self._salts))
            self._by_name[name] = adapter
        bank.wrap(list(factors))
        self._restack()
        return ModelCard(name=name, context_length=self._context_length, base=self.parent)

    def _restack(self) -> None:
        if self._bank is not None:
            with self._lock:
                adapters = list(self._by_name.values())
            self._bank.rebuild(adapters)


def _chatbus_json(path: Path) -> dict[str, Any]:
    try:
        info: dict[str, Any] = json.loads((path / "chatbus.json").read_text())
    except (OSError, ValueError):
        return {}
    return info
