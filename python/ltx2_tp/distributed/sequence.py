"""Attention over a video sequence split across the SP ranks (Ulysses x ring).

`SequenceLayout` says which tokens each SP rank holds. `self_attention` takes this rank's q/k/v
(B, n_local, H_tp, d) and returns its rows of attention over the whole sequence: Ulysses all-to-all,
ring, or Ulysses inside a ring. `SplitKeyAttention` serves queries every rank holds whole (audio)
against keys the ranks split (video): each rank attends to its own keys, then the partial results
merge across the SP group by log-sum-exp.

`self_attention_keys` serves self-attention in two passes (block.py, when the queries span more
than one chunk): `add(k, v)` for each pass-1 chunk of this rank's tokens puts them where every
query can reach them (this rank's K/V store; under Ulysses an all-to-all per chunk to the ranks
that attend their heads, over the whole sequence), then `attend(q)` for each pass-2 chunk returns
its rows of attention over all keys. Every rank of a sequence group runs the same chunks
(`SequenceLayout.lockstep_chunks`: a rank with fewer tokens runs shorter, possibly empty ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.distributed.collectives import (all_reduce_max, all_reduce_sum, part_range, part_sizes,
                                            ulysses_exchange_start, ulysses_heads_to_seq, ulysses_pack,
                                            ulysses_pack_kv, ulysses_seq_to_heads, ulysses_unpack)
from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.distributed.ring import ring_attention
from ltx2_tp.distributed.ulysses import head_group_count, ulysses_attention, ulysses_pipelined
from ltx2_tp.layers.attention_backend import LseAccumulator, attention_lse, local_attention
from ltx2_tp.memory.offload import key_values
from ltx2_tp.memory.plan import ExecutionPlan, token_chunks


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

    @property
    def local_tokens(self) -> int:
        s, e = self.local_range
        return e - s

    def lockstep_chunks(self, size: int | None) -> list[tuple[int, int]]:
        """Chunks of `size` over the most tokens a rank holds, as every rank runs them (collectives
        per chunk need the same count everywhere); this rank's tokens of each, possibly none."""
        n = self.local_tokens
        return [(min(s, n), min(e, n)) for s, e in token_chunks(max(self.sizes), size)]


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


# ---- two-pass self-attention -------------------------------------------------------------------
def self_attention_keys(layout: SequenceLayout, ctx: ParallelContext, plan: ExecutionPlan,
                        mask: torch.Tensor | None = None, kv_offload: bool = False,
                        window=None) -> "_LocalKeys | _UlyssesKeys":
    """The keys of a two-pass self-attention over `layout`'s tokens: this rank's K/V when the
    sequence is whole here, Ulysses when it is split (ring attention runs in one pass: block.py).
    kv_offload: the K/V store is parked in host memory (plan.kv_block_tokens per streamed block).
    window: the temporal-window approximation (layers/windowed_attention.py), on the device store."""
    if window is not None and kv_offload:
        raise NotImplementedError("--attention-window-frames is not supported with K/V offload")
    if not layout.split:
        return _LocalKeys(layout, plan, mask, kv_offload, window)
    if mask is not None:
        raise NotImplementedError("a self-attention mask (Modality.attention_mask) is supported only with sp_size=1")
    if ctx.ring_size > 1:
        raise NotImplementedError("two-pass self-attention under ring attention (it runs in one pass)")
    return _UlyssesKeys(layout, ctx, plan, kv_offload, window)


class _LocalKeys:
    """All keys on this rank: K/V in a store of this rank's tokens (memory/offload.py's tier)."""

    def __init__(self, layout: SequenceLayout, plan: ExecutionPlan, mask: torch.Tensor | None, kv_offload: bool,
                 window=None):
        n = layout.local_tokens
        self.plan, self.mask, self.n, self.offload, self.window = plan, mask, n, kv_offload, window
        self.pass1 = token_chunks(n, plan.attn_chunk_tokens)
        self.pass2 = plan.out_chunks(n, plan.attn_chunk_tokens)
        self.store, self.i1, self.i2 = None, 0, 0

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        s, e = self.pass1[self.i1]
        self.i1 += 1
        if self.store is None:
            b, _, h, d = k.shape
            self.store = key_values(self.offload, self.plan.kv_block_tokens, b, self.n, h, d, k.dtype, k.device)
        self.store.write(s, e, k, v)

    def finish(self) -> None:
        pass

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        s, e = self.pass2[self.i2]
        self.i2 += 1
        if self.window is not None:  # the query chunk's rows of the sequence against the stored keys
            return self.window.attention(q, self.store.k, self.store.v, None, self.mask, [(s, e - s)])
        return self.store.attend(q, mask=None if self.mask is None else self.mask[..., s:e, :])


class _UlyssesKeys:
    """Ulysses, two passes. Pass 1: each chunk's K/V go through one all-to-all (issued, and placed
    in the store one chunk later, so it runs under the next chunk's projection) to the ranks whose
    heads they are: the store holds every token of this Ulysses group for this rank's H/U heads.
    Pass 2: each query chunk goes through Ulysses in the plan's head groups (ulysses_pipelined)
    against the stored keys, and its output comes back."""

    def __init__(self, layout: SequenceLayout, ctx: ParallelContext, plan: ExecutionPlan, kv_offload: bool,
                 window=None):
        self.ctx, self.plan, self.offload, self.window = ctx, plan, kv_offload, window
        self.sizes = layout.ulysses_sizes
        self.offsets = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        most = max(self.sizes)
        self.steps1 = token_chunks(most, plan.attn_chunk_tokens)  # as every rank runs them
        self.steps2 = plan.out_chunks(most, plan.attn_chunk_tokens)
        self.pass1, self.pass2 = layout.lockstep_chunks(plan.attn_chunk_tokens), self._clip(self.steps2, layout)
        self.store, self.groups, self.inflight = None, 1, None
        self.i1 = self.i2 = 0

    def _clip(self, steps, layout):
        n = layout.local_tokens
        return [(min(s, n), min(e, n)) for s, e in steps]

    def _parts(self, s: int, e: int) -> list[int]:
        """Tokens of chunk [s, e) on each rank of the Ulysses group."""
        return [max(0, min(e, n) - s) for n in self.sizes]

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        s, e = self.steps1[self.i1]
        self.i1 += 1
        u = self.ctx.ulysses_size
        if self.store is None:
            b, _, h, d = k.shape
            self.groups = head_group_count(h, u, self.plan.ulysses_head_groups)
            self.store = key_values(self.offload, self.plan.kv_block_tokens, b, sum(self.sizes), h // u, d,
                                    k.dtype, k.device)
        parts = self._parts(s, e)
        nxt = (s, parts, ulysses_exchange_start(ulysses_pack_kv(k, v, parts, u, self.groups), self.ctx.ulysses_group))
        self.finish()
        self.inflight = nxt

    def finish(self) -> None:
        """Place the last chunk's K/V (after the last add)."""
        if self.inflight is None:
            return
        s, parts, pending = self.inflight
        self.inflight = None
        recv = pending.wait()  # (U, G, 2B, nmax, hg, d)
        _, g, b2, _, hg, d = recv.shape
        for r, size in enumerate(parts):
            if size:
                piece = recv[r, :, :, :size].permute(1, 2, 0, 3, 4).reshape(b2, size, g * hg, d)
                start = self.offsets[r] + s
                self.store.write(start, start + size, piece[: b2 // 2], piece[b2 // 2 :])

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        s, e = self.steps2[self.i2]
        self.i2 += 1
        parts, u, g = self._parts(s, e), self.ctx.ulysses_size, self.groups
        hg = q.shape[2] // (g * u)
        qs = ulysses_pack(q, parts, u, g)

        def attend_group(i, qi):
            heads = None if g == 1 else slice(i * hg, (i + 1) * hg)
            if self.window is not None:  # qi: each rank's tokens of the chunk, in rank order
                k, v = (t if heads is None else t[:, :, heads] for t in (self.store.k, self.store.v))
                return self.window.attention(qi, k, v, None, None, [(o + s, p) for o, p in zip(self.offsets, parts) if p])
            return self.store.attend(qi, heads)

        return ulysses_unpack(ulysses_pipelined((qs,), parts, self.ctx, attend_group), q.shape[1])
