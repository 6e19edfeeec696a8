"""One measurement for the step-cost benches (omp_team.py, step_cost.py): batch-1 decode steps of
node.slotforward after a prefill, in milliseconds a step. Imported by their child processes."""

from __future__ import annotations

import time
from typing import Any

import torch

from node.kvcache import SlotCache


def step_ms(forward: Any, prompt: torch.Tensor, steps: int, warm: int = 5) -> float:
    """Prefill `prompt` [1, T] into a fresh one-row cache, decode `warm` steps, then time `steps`."""
    cache = SlotCache(forward.kv_shape)
    cache.add_rows(1)
    with torch.inference_mode():
        forward(cache, prompt, 0)
        token = torch.tensor([[5]])
        for _ in range(warm):
            forward(cache, token, 0)
        started = time.perf_counter()
        for _ in range(steps):
            forward(cache, token, 0)
    return 1000 * (time.perf_counter() - started) / steps
