"""Attention over a video sequence split across the SP ranks (Ulysses x ring).

`SequenceLayout` says which tokens each SP rank holds. `self_attention` takes this rank's q/k/v
(B, n_local, H_tp, d) and returns its rows of attention over the whole sequence: Ulysses all-to-all,
ring, or Ulysses inside a ring. `SplitKeyAttention` serves queries every rank holds whole (audio)
against keys the ranks split (video): each rank attends to its own keys, then the partial results
merge across the SP group by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.distributed.collectives import (all_reduce_max, all_reduce_sum, part_range, part_sizes,
                                            ulysses_heads_to_seq, ulysses_seq_to_heads)
from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.distributed.ring import ring_attention
from ltx2_tp.distributed.ulysses import ulysses_attention
from ltx2_tp.layers.attention_backend import LseAccumulator, attention_lse, local_attention


@dataclass(frozen=True)
class SequenceLayout:
    total: int
    sizes: tuple[int, ...]  # tokens of every SP part, in sequence order
    ulysses_size: int = 1
    sp_rank: int = 0

    @classmethod
    def for_context(cls, total: int, ctx: ParallelContext) -> "SequenceLayout":
        return cls(total, tuple(part_sizes(total, ctx.sp_size)), ctx.ulysses_size, ctx.sp_rank)

    @classmethod
    def whole(cls, total: int) -> "SequenceLayout":
        """Every rank holds all tokens (audio)."""
        return cls(total, (total,))

    @property
    def split(self) -> bool:
        return len(self.sizes) > 1

    @property
    def local_range(self) -> tuple[int, int]:
        return part_range(self.total, len(self.sizes), self.sp_rank)

    @property
    def ulysses_sizes(self) -> list[int]:
        g = self.sp_rank // self.ulysses_size
        return list(self.sizes[g * self.ulysses_size : (g + 1) * self.ulysses_size])

    @property
    def ring_block_sizes(self) -> list[int]:
        u = self.ulysses_size
        return [sum(self.sizes[i : i + u]) for i in range(0, len(self.sizes), u)]


def self_attention(q, k, v, layout: SequenceLayout, ctx: ParallelContext, q_chunk: int | None,
                   mask: torch.Tensor | None = None, head_groups: int = 1, window=None) -> torch.Tensor:
    """`window`: a layers/windowed_attention.TemporalWindow (the opt-in approximation), which
    attends wherever a rank holds every token of its heads: one GPU, TP, Ulysses."""
    attend = local_attention if window is None else window.attention
    if not layout.split:  # traced with the rest of a compiled block: no graph break on one GPU
        return attend(q, k, v, q_chunk, mask)
    if mask is not None:
        raise NotImplementedError("a self-attention mask (Modality.attention_mask) is supported only with sp_size=1")
    if ctx.ring_size == 1:
        return ulysses_attention(q, k, v, layout.ulysses_sizes, ctx, q_chunk, head_groups, attend)
    if window is not None:  # each ring step holds one K/V block: windows would need per-block ranges
        raise NotImplementedError("--attention-window-frames is not supported with ring attention (--ring-size > 1); "
                                  "use Ulysses (--ulysses-size)")
    return _ring_attention(q, k, v, layout, ctx, q_chunk)


@torch.compiler.disable  # left eager inside compiled blocks: its collectives stay async and overlap
def _ring_attention(q, k, v, layout: SequenceLayout, ctx: ParallelContext, q_chunk: int | None) -> torch.Tensor:
    """Ring attention, with Ulysses inside each ring member when ulysses_size > 1."""
    if ctx.ulysses_size > 1:
        sizes = layout.ulysses_sizes
        q, k, v = (ulysses_seq_to_heads(t, sizes, ctx.ulysses_group) for t in (q, k, v))
    out = ring_attention(q, k, v, layout.ring_block_sizes, ctx.ring_group, q_chunk)
    if ctx.ulysses_size > 1:
        out = ulysses_heads_to_seq(out, layout.ulysses_sizes, ctx.ulysses_group)
    return out


class SplitKeyAttention:
    """Queries q (B, Nq, H, d) held whole on every rank against keys split over the SP ranks:
    `add(k, v)` for each block of this rank's keys, then `result()` (fp32 merge, q's dtype out)."""

    def __init__(self, q: torch.Tensor, layout: SequenceLayout, ctx: ParallelContext):
        self.q, self.layout, self.ctx = q, layout, ctx
        self.acc = LseAccumulator()

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.acc.add(*attention_lse(self.q, k, v))

    def result(self) -> torch.Tensor:
        q, acc = self.q, self.acc
        if acc.out is None:  # this rank holds no keys
            acc.out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
            acc.lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        if not self.layout.split:
            return acc.out.to(q.dtype)
        group = self.ctx.sp_group
        m = all_reduce_max(acc.lse.clone(memory_format=torch.contiguous_format), group)
        w = torch.exp(acc.lse - m)  # (B, H, N)
        num = all_reduce_sum(acc.out * w.transpose(1, 2).unsqueeze(-1), group)
        den = all_reduce_sum(w, group)
        return (num / den.transpose(1, 2).unsqueeze(-1)).to(q.dtype)
