"""Timestep embedding, AdaLN-single, and per-token modulation held as (distinct values, index).

A step has few distinct timesteps (one, or two with image conditioning where first-frame tokens
carry timestep 0), so AdaLN-single runs on the distinct values once per forward and each chunk
gathers its rows: the tokens x 6D tensor of per-token values is never built.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding, cos first (ltx-core: flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, in_channels: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = timestep_embedding(t, self.linear_1.in_features).to(dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class _Emb(nn.Module):  # keeps the checkpoint path adaln_single.emb.timestep_embedder.*
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class AdaLayerNormSingle(nn.Module):
    """PixArt-alpha adaLN-single: timestep -> (coefficient * dim modulation, dim embedding)."""

    def __init__(self, dim: int, coefficient: int):
        super().__init__()
        self.emb = _Emb(dim)
        self.linear = nn.Linear(dim, coefficient * dim)
        self.coefficient = coefficient

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb.timestep_embedder(t, dtype)
        return self.linear(nn.functional.silu(embedded)), embedded


class TokenModulation:
    """Per-token rows of a (distinct values x width) table: rows(s, e) -> (B, e-s or 1, width)."""

    def __init__(self, values: torch.Tensor, index: torch.Tensor | None, batch: int):
        self.values, self.index, self.batch = values, index, batch

    @classmethod
    def build(cls, timesteps: torch.Tensor, fn) -> tuple["TokenModulation", ...]:
        """timesteps (B, T) or (B, 1) -> TokenModulation for each output of fn(distinct values)."""
        b = timesteps.shape[0]
        ts = timesteps.reshape(b, -1)
        if ts.shape[1] == 1:
            return tuple(cls(v.view(b, 1, -1), None, b) for v in fn(ts.flatten()))
        distinct, index = torch.unique(ts, return_inverse=True)
        return tuple(cls(v, index, b) for v in fn(distinct))

    def rows(self, start: int, end: int, k: int = 1, sl: slice = slice(None)) -> torch.Tensor:
        """Rows of tokens [start, end), their width seen as k parameters of which `sl` are gathered:
        (B, e-s or 1, len(sl), width / k); k=1: (B, e-s or 1, width)."""
        values = self.values if k == 1 else self.values.unflatten(-1, (k, -1))[..., sl, :]
        return values if self.index is None else values[self.index[:, start:end]]


def ada_values(table: torch.Tensor, mod: TokenModulation, start: int, end: int, sl: slice) -> tuple[torch.Tensor, ...]:
    """ltx-core get_ada_values for a token range: table[sl] + timestep rows, split per parameter.
    Only the parameters in `sl` are gathered per token (2-3 of the 6 or 9: the chunk's largest
    AdaLN temporary is len(sl) x D per token, not k x D)."""
    rows = mod.rows(start, end, table.shape[0], sl)
    vals = table[sl].to(device=rows.device, dtype=rows.dtype)[None, None] + rows
    return vals.unbind(dim=2)
