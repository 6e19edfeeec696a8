"""The train job's spec and result (carried raw inside bus.schemas_jobs envelopes).

Defaults scale FastChat's Vicuna recipe (lr 2e-5 full / 2e-4 LoRA, 3 epochs, warmup 3 %, cosine,
no weight decay, effective batch 128 at 2048 tokens) down to a single small machine: effective
batch 16 (2 × 8 accumulation) at 512 tokens. docs/training.md explains each choice.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["DataReport", "Method", "TrainResult", "TrainSpec", "default_lr"]

Method = Literal["lora", "qlora", "full"]


def default_lr(method: Method) -> float:
    """Vicuna's full fine-tuning lr; LoRA/QLoRA train far fewer weights and want ~10× more."""
    return 2e-5 if method == "full" else 2e-4


class TrainSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to train: base model, dataset artifact, method and hyperparameters."""

    data: str  # Object Store name of the dataset (json list or jsonl), e.g. "datasets/<digest>"
    data_name: str = ""  # the file name it was uploaded from (for humans)
    base: str = "default"  # "default" (SmolLM2-135M-Instruct), a local HF model dir or a hub id
    method: Method = "lora"
    name: str = ""  # the served name of the result; default "<base>-<job id tail>"
    max_steps: int = 0  # optimizer steps; 0 → epochs × steps per epoch
    epochs: float = 3.0
    lr: float = 0.0  # 0 → default_lr(method)
    batch_size: int = 2  # samples per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    max_len: int = 512  # tokens; longer samples are truncated (reported)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = msgspec.field(default_factory=lambda: ["all-linear"])
    grad_checkpointing: bool = False
    dtype: str = "auto"  # auto (bf16 autocast where the device does it well) | bfloat16 | float16 | float32
    device: str = "auto"
    checkpoint_every: int = 50  # optimizer steps between checkpoints in the Object Store (0: only at stop)
    log_every: int = 1
    seed: int = 42


class DataReport(msgspec.Struct, frozen=True, kw_only=True):
    """What became of the dataset: kept, truncated and dropped samples, with reasons."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = msgspec.field(default_factory=dict)  # reason → count
    examples: list[str] = msgspec.field(default_factory=list)  # "line 7: reason" (first few)
    tokens: int = 0  # tokens kept in all
    assistant_tokens: int = 0  # of which carry loss

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.items())
        text = f"{self.kept}/{self.total} samples kept, {self.truncated} truncated, {dropped} dropped"
        return text + (f" ({reasons})" if reasons else "")


class TrainResult(msgspec.Struct, frozen=True, kw_only=True):
    """The `done` event's result: where the weights went and how training went."""

    method: Method
    base: str
    name: str  # the model name to serve it under
    artifact: str  # Object Store name of the tar of the adapter dir (or the full model dir)
    config: str = ""  # Object Store name of the job's spec + report (json)
    metrics: str = ""  # Object Store name of the per-step metrics (jsonl)
    steps: int = 0
    final_loss: float = 0.0
    first_loss: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0  # the checkpoint step this attempt started from (0: from scratch)
    data: DataReport = msgspec.field(default_factory=DataReport)
    base_name: str = ""  # the name a node serves the base under (what the adapter is judged against)
