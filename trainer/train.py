"""One flat training loop (nanoGPT spirit): AdamW, grad accumulation, cosine lr with warmup, autocast, checkpoints.

No NATS here: the worker passes `Hooks` (report a step, store a checkpoint, ask whether to stop) and
gets an `Outcome` back; the weights land in `out_dir` as a peft adapter dir or a full model dir.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.data import IGNORE, Sample, batches_per_epoch, micro_batches, parse_dataset, tokenize_dataset
from trainer.model import load_for_training
from trainer.schemas import DataReport, TrainSpec, default_lr

__all__ = ["Hooks", "Outcome", "lr_at", "run"]


@dataclass
class Hooks:
    progress: Callable[[dict[str, float]], None] = lambda metrics: None  # after every log_every steps
    checkpoint: Callable[[int, bytes], None] = lambda step, blob: None  # store it (blocking)
    stop: Callable[[], str | None] = lambda: None  # "cancel" | "shutdown" | None
    log: Callable[[str], None] = print


@dataclass
class Outcome:
    stopped: str | None  # None when training finished
    steps: int = 0
    total_steps: int = 0
    resumed_from: int = 0
    first_loss: float = 0.0
    final_loss: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    report: DataReport = field(default_factory=DataReport)
    history: list[dict[str, float]] = field(default_factory=list)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at `total` (FastChat/Vicuna's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def collate(samples: list[Sample], indices: list[int], pad_id: int, device: str) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids, labels (IGNORE on padding) and attention mask."""
    width = max(len(samples[i].input_ids) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(samples[i].input_ids)
        ids[row, :n] = torch.tensor(samples[i].input_ids)
        labels[row, :n] = torch.tensor(samples[i].labels)
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def run(
    spec: TrainSpec,
    dataset: bytes,
    *,
    cache_dir: Path,
    out_dir: Path,
    hooks: Hooks,
    checkpoint: bytes | None = None,
) -> Outcome:
    torch.manual_seed(spec.seed)
    conversations = parse_dataset(dataset, spec.data_name or spec.data)
    t_load = time.perf_counter()
    loaded = load_for_training(spec, cache_dir, hooks.log)
    t_load = time.perf_counter() - t_load
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    samples, report = tokenize_dataset(tokenizer, conversations, spec.max_len)
    hooks.log(
        f"{spec.method} on {loaded.device} (base loaded in {t_load:.1f} s): {loaded.trainable:,} of "
        f"{loaded.total:,} parameters train; data: {report.summary()}"
    )

    params = [p for p in model.parameters() if p.requires_grad]
    peak_lr = spec.lr or default_lr(spec.method)
    optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=spec.weight_decay, betas=(0.9, 0.999))
    accum = max(1, spec.grad_accum)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch(len(samples), spec.batch_size) / accum))
    total = spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch))
    warmup = math.ceil(total * spec.warmup_ratio)
    out = Outcome(stopped=None, total_steps=total, report=report)
    if checkpoint is not None:
        out.resumed_from = _restore(checkpoint, model, optimizer, out)
        hooks.log(f"resumed from the checkpoint at step {out.resumed_from}")
    batches = islice(micro_batches(samples, spec.batch_size, spec.seed), out.resumed_from * accum, None)
    use_autocast = loaded.autocast is not None
    autocast = torch.autocast(
        device.split(":")[0], dtype=loaded.autocast or torch.float32, enabled=use_autocast
    )
    scaler = torch.amp.GradScaler(enabled=loaded.autocast == torch.float16 and device.startswith("cuda"))
    started = time.perf_counter()

    for step in range(out.resumed_from, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, peak_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_batches = [next(batches) for _ in range(accum)]
        # Normalise by the step's assistant tokens, so every token weighs the same however it is batched.
        targets = sum(sum(t != IGNORE for t in samples[i].labels[1:]) for b in step_batches for i in b)
        loss_value, tokens = 0.0, 0
        for indices in step_batches:
            ids, labels, mask = collate(samples, indices, tokenizer.pad_token_id, device)
            with autocast:
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                labels[:, 1:].flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            ) / max(1, targets)
            scaler.scale(loss).backward()
            loss_value += loss.item()
            tokens += int(mask.sum())
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        elapsed = time.perf_counter() - started
        out.steps, out.final_loss, out.tokens = done, loss_value, out.tokens + tokens
        out.first_loss = out.first_loss or loss_value
        metrics = {
            "step": float(done),
            "total_steps": float(total),
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "epoch": done / steps_per_epoch,
            "tokens_per_s": tokens / max(1e-9, time.perf_counter() - t0),
            "eta_s": (total - done) * elapsed / (done - out.resumed_from),
        }
        out.history.append(metrics)
        if done % max(1, spec.log_every) == 0 or done == total:
            hooks.progress(metrics)
        reason = hooks.stop()
        periodic = spec.checkpoint_every > 0 and done % spec.checkpoint_every == 0 and done < total
        if reason == "shutdown" or (periodic and reason is None):
            hooks.checkpoint(done, _pack(done, model, optimizer, out))
        if reason is not None:
            out.stopped = reason
            return out

    out.seconds = time.perf_counter() - started
    _save(model, tokenizer, spec, loaded.autocast, out_dir)
    return out


# ----------------------------------------------------------------------------- checkpoints and output


def _pack(step: int, model: Any, optimizer: torch.optim.Optimizer, out: Outcome) -> bytes:
    """Trainable weights, optimizer state and history: enough to go on exactly where this left off."""
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "history": out.history,
        "tokens": out.tokens,
        "first_loss": out.first_loss,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _restore(blob: bytes, model: Any, optimizer: torch.optim.Optimizer, out: Outcome) -> int:
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    missing = set(state["trainable"]) - {n for n, p in model.named_parameters() if p.requires_grad}
    if missing:
        raise ValueError(f"the checkpoint does not fit this model ({len(missing)} unknown weights)")
    model.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    out.history = list(state["history"])
    out.tokens, out.first_loss = int(state["tokens"]), float(state["first_loss"])
    out.steps = int(state["step"])
    return out.steps


def _save(model: Any, tokenizer: Any, spec: TrainSpec, compute: torch.dtype | None, out_dir: Path) -> None:
    """A peft adapter dir (lora/qlora) or a full model dir in the compute dtype, with the tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    if spec.method == "full" and compute in (torch.bfloat16, torch.float16):
        model = model.to(compute)  # what a node serves anyway; half the bytes to store
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
