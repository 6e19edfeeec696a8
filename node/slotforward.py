"""The forward pass of a Llama-family decoder over a SlotCache, reusing the model's own modules.

transformers' forward builds masks, cache objects and output records per call, which a 135M-parameter
model pays on every decode step; this one runs the same modules (embeddings, norms, projections,
rotary embedding, MLPs, LM head) and does only attention itself: write the new keys/values into each
row's slot in place, then one SDPA over the rows' slots with a per-row length mask. Models whose
attention differs (sliding windows, ALiBi, MLA, ...) are not `supported` and keep transformers' path.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F

from node.kvcache import KVShape, SlotCache

__all__ = ["SlotForward", "supported"]

_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}


def supported(model: Any) -> bool:
    """Does this model's decoder match the Llama layout that SlotForward runs?"""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _FAMILIES:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        if config.sliding_window < getattr(config, "max_position_embeddings", 0):
            return False
    decoder = model.get_decoder()
    parts = ("layers", "embed_tokens", "norm", "rotary_emb")
    if not all(hasattr(decoder, p) for p in parts):
        return False
    attn = decoder.layers[0].self_attn
    return all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"))


class SlotForward:
    """Runs the model's modules over a SlotCache; returns float32 logits of each row's last real token."""

    def __init__(self, model: Any) -> None:
        decoder = model.get_decoder()
        config = model.config
        self.layers = list(decoder.layers)
        self.embed = decoder.embed_tokens
        self.norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scaling = float(self.layers[0].self_attn.scaling)
        module = importlib.import_module(type(model).__module__)
        self._rotate = module.apply_rotary_pos_emb
        weight = self.embed.weight
        # bf16 SDPA expands grouped kv heads slowly (7× at 2,000 columns on machine C); float32 does not.
        self._grouped = self.kv_heads != self.heads and weight.dtype != torch.float32
        self.kv_shape = KVShape(len(self.layers), self.kv_heads, self.head_dim, weight.dtype, weight.device)

    def __call__(
        self, cache: SlotCache, ids: torch.Tensor, first: int, counts: list[int] | None = None
    ) -> torch.Tensor:
        """Feed `ids` [n, T] to rows first..first+n-1: row r gets counts[r] real tokens (right-padded).

        Without `counts` every token is real (a decode step when T is 1).
        """
        n, width = ids.shape
        device = ids.device
        starts = cache.lengths[first : first + n]
        steps = torch.arange(width, device=device)
        positions = starts[:, None] + steps[None, :]  # [n, T]
        longest = int(starts.max()) + width
        cache.reserve(cache.rows, longest)
        rows = torch.arange(first, first + n, device=device)[:, None]  # [n, 1], with positions: [n, T]
        mask = self._mask(positions, longest, n == 1 and width == 1)

        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions)
        for index, layer in enumerate(self.layers):
            x = layer.input_layernorm(hidden)
            x = self._attend(
                layer.self_attn, x, cos, sin, cache, index, (rows, positions), mask, first, longest
            )
            hidden = hidden + x
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        if counts is None:
            last = hidden[:, -1]
            cache.lengths[first : first + n] += width
        else:
            real = torch.tensor(counts, device=device)
            last = hidden[torch.arange(n, device=device), real - 1]
            cache.lengths[first : first + n] += real
        return self.lm_head(self.norm(last)).float()

    def _mask(self, positions: torch.Tensor, longest: int, alone: bool) -> torch.Tensor | None:
        """The attention mask of one step, built once for every layer: None for one row decoding one
        token (every column it holds is its own, so SDPA needs none)."""
        if alone:
            return None
        width = positions.shape[1]
        cols = torch.arange(longest, device=positions.device)
        mask = (cols[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [n, 1, T, L]
        if self._grouped and width > 1:  # query heads of a kv head ride as one longer query
            mask = mask.repeat(1, 1, self.heads // self.kv_heads, 1)
        return mask

    def _attend(
        self,
        attn: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: SlotCache,
        index: int,
        where: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        first: int,
        longest: int,
    ) -> torch.Tensor:
        n, width, _ = x.shape
        q = attn.q_proj(x).view(n, width, self.heads, self.head_dim)
        k = attn.k_proj(x).view(n, width, self.kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, width, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before rotating
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        keys, values = cache.keys[index], cache.values[index]
        # In place, each row's next columns: index_put over (row, position) pairs, [n, T, kv_heads,
        # head_dim] values. (scatter_ along the column dim cost 30-40× more on CPU: ~8 ms a decode step.)
        rows, positions = where
        keys[rows, :, positions] = k.transpose(1, 2)
        values[rows, :, positions] = v
        keys, values = keys[first : first + n, :, :longest], values[first : first + n, :, :longest]
        if self._grouped:  # the query heads that share a kv head as one longer query: no GQA expansion
            groups = self.heads // self.kv_heads
            q = q.reshape(n, self.kv_heads, groups * width, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            out = out.view(n, self.heads, width, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=self.kv_heads != self.heads
            )
        return attn.o_proj(out.transpose(1, 2).reshape(n, width, -1))
