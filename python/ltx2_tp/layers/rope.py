"""3-D (video) / 1-D (audio, cross a<->v) rotary embeddings, computed for any token range.

Same arithmetic as ltx-core's rope.py, but the cos/sin tables are built from the positions of a
token range only and cut to this TP rank's heads, so no rank ever holds the whole sequence's
table unless the plan chooses to cache it (`StreamRope`).
Returned layout: (B, tokens, groups, per_group). SPLIT rotates the two halves of each head, so its
groups are this rank's heads. INTERLEAVED rotates adjacent channel pairs over the whole inner dim,
as ltx-core does, so its one group is all of this rank's channels: a head of odd size shares a
pair with its neighbour (config.py keeps pairs from straddling TP ranks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch


@functools.lru_cache(maxsize=16)
def _freq_grid(theta: float, n_pos_dims: int, dim: int, double_precision: bool) -> torch.Tensor:
    n = dim // (2 * n_pos_dims)
    if double_precision:  # ltx-core generate_freq_grid_np
        pw = np.power(theta, np.linspace(np.log(1) / np.log(theta), np.log(theta) / np.log(theta), n, dtype=np.float64))
        return torch.tensor(pw * math.pi / 2, dtype=torch.float32)
    idx = theta ** torch.linspace(math.log(1, theta), math.log(theta, theta), n, dtype=torch.float32)
    return idx.to(torch.float32) * math.pi / 2


@functools.lru_cache(maxsize=16)
def _freq_grid_on(theta: float, n_pos_dims: int, dim: int, double_precision: bool, device: torch.device) -> torch.Tensor:
    """_freq_grid on `device`, copied once: a copy per forward from pageable memory waited for the
    stream (8 host-GPU synchronisations a guided step on an H100)."""
    return _freq_grid(theta, n_pos_dims, dim, double_precision).to(device)


@dataclass(frozen=True)
class RopeSpec:
    dim: int  # full inner dim the embedding spans (all heads)
    num_heads: int  # heads the SPLIT layout is reshaped into
    max_pos: tuple[int, ...]
    rope_type: str
    theta: float
    use_middle_indices_grid: bool
    double_precision: bool
    tp_size: int = 1
    tp_rank: int = 0


def rope_cos_sin(positions: torch.Tensor, spec: RopeSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, P, n, 2) or (B, P, n) -> cos, sin (B, n, groups, per_group) as the module says."""
    n_pos = positions.shape[1]
    assert n_pos == len(spec.max_pos), f"positions have {n_pos} axes, max_pos {spec.max_pos}"
    grid = positions
    if spec.use_middle_indices_grid:
        assert grid.ndim == 4 and grid.shape[-1] == 2
        grid = (grid[..., 0] + grid[..., 1]) / 2.0
    elif grid.ndim == 4:
        grid = grid[..., 0]
    frac = torch.stack([grid[:, i] / spec.max_pos[i] for i in range(n_pos)], dim=-1)  # (B, n, P)
    indices = _freq_grid_on(spec.theta, n_pos, spec.dim, spec.double_precision, frac.device)
    freqs = (indices * (frac.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(2)  # (B, n, F*P)
    if spec.rope_type == "split":
        b, n = freqs.shape[:2]
        h_local = spec.num_heads // spec.tp_size
        pad = spec.dim // 2 - freqs.shape[-1]
        cos, sin = freqs.cos(), freqs.sin()
        if pad:
            cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
            sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
        half = spec.dim // 2 // spec.num_heads
        cos, sin = (t.reshape(b, n, spec.num_heads, half).narrow(2, spec.tp_rank * h_local, h_local) for t in (cos, sin))
    elif spec.rope_type == "interleaved":
        cos = freqs.cos().repeat_interleave(2, dim=-1)
        sin = freqs.sin().repeat_interleave(2, dim=-1)
        pad = spec.dim % (2 * n_pos)
        if pad:
            cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
            sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
        per_rank = spec.dim // spec.tp_size
        cos, sin = (t.narrow(-1, spec.tp_rank * per_rank, per_rank).unsqueeze(2) for t in (cos, sin))
    else:
        raise ValueError(f"rope_type must be 'interleaved' or 'split', got {spec.rope_type!r}")
    # a copy of this rank's heads alone (narrow keeps the whole table alive; .to(dtype) copies
    # only when the dtype changes)
    return cos.to(dtype).contiguous(), sin.to(dtype).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_type: str) -> torch.Tensor:
    """x (B, n, H_l, d) viewed as (B, n, cos.shape[2], -1): the table's groups decide the grouping."""
    shape = x.shape
    x = x.reshape(*cos.shape[:3], shape[-2] * shape[-1] // cos.shape[2])
    if rope_type == "interleaved":
        pairs = x.unflatten(-1, (-1, 2))
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        out = x * cos + rot * sin
    else:
        halves = x.unflatten(-1, (2, -1))  # (..., 2, d/2)
        out = halves * cos.unsqueeze(-2)
        out[..., 0, :].addcmul_(-sin, halves[..., 1, :])
        out[..., 1, :].addcmul_(sin, halves[..., 0, :])
        out = out.flatten(-2)
    return out.reshape(shape)


class StreamRope:
    """cos/sin for this rank's tokens of one stream: cached once per forward, or per chunk. A cached
    table is built `chunk` tokens at a time (its fp32 angles and every head's cos/sin are about 3x
    the table: whole, they would be the forward's largest temporary)."""

    def __init__(self, positions: torch.Tensor, spec: RopeSpec, dtype: torch.dtype, cache: bool,
                 chunk: int | None = None):
        self.positions, self.spec, self.dtype = positions, spec, dtype
        self.table = None
        if cache:
            n = positions.shape[2]
            chunks = [(s, min(s + chunk, n)) for s in range(0, n, chunk)] if chunk and chunk < n else [(0, n)]
            if len(chunks) == 1:
                self.table = rope_cos_sin(positions, spec, dtype)
            else:
                cos, sin = rope_cos_sin(positions[:, :, :0], spec, dtype)  # the layout, for no tokens
                self.table = tuple(t.new_empty(t.shape[0], n, *t.shape[2:]) for t in (cos, sin))
                for s, e in chunks:
                    for buf, part in zip(self.table, rope_cos_sin(positions[:, :, s:e], spec, dtype)):
                        buf[:, s:e] = part

    def __call__(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None:
            return self.table[0][:, start:end], self.table[1][:, start:end]
        return rope_cos_sin(self.positions[:, :, start:end], self.spec, self.dtype)
