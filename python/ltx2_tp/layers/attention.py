"""Attention weights and projections, heads sharded over TP.

Self-attention fuses q/k/v into one column-parallel GEMM (checkpoint to_q/to_k/to_v load as its
shards); cross-attention keeps q (from the stream) apart from a fused k/v (from the context).
The output projection is row-parallel: one all-reduce per call. The attention itself is not
here: the block decides what attends to what (local, Ulysses, ring) and calls these pieces.
"""

from __future__ import annotations

import torch
from torch import nn

from ltx2_tp.distributed.collectives import Pending
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from ltx2_tp.layers.norm import ShardedRMSNorm, rms_norm_pair


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 norm_eps: float = 1e-6, gated: bool = False, ctx: ParallelContext = SINGLE):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.ctx = heads, dim_head, ctx
        self.heads_local = heads // ctx.tp_size
        self.is_self = context_dim is None
        if self.is_self:
            self.to_qkv = MergedColumnParallelLinear(query_dim, [inner] * 3, ("to_q", "to_k", "to_v"), ctx=ctx)
        else:
            self.to_q = ColumnParallelLinear(query_dim, inner, ctx=ctx)
            self.to_kv = MergedColumnParallelLinear(context_dim, [inner] * 2, ("to_k", "to_v"), ctx=ctx)
        self.q_norm = ShardedRMSNorm(inner, norm_eps, ctx)
        self.k_norm = ShardedRMSNorm(inner, norm_eps, ctx)
        self.to_gate_logits = ColumnParallelLinear(query_dim, heads, ctx=ctx) if gated else None
        self.to_out = nn.ModuleList([RowParallelLinear(inner, query_dim, ctx=ctx)])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads_local, self.dim_head))

    def qkv(self, h: torch.Tensor):
        """Self-attention: normed q, k and v, each (B, n, H_local, d)."""
        q, k, v = self.to_qkv(h)
        q, k = rms_norm_pair(self.q_norm, self.k_norm, q, k)
        return self._heads(q), self._heads(k), self._heads(v)

    def v_only(self, h: torch.Tensor) -> torch.Tensor:
        """The value projection alone (STG skips the attention and passes v through)."""
        return self._heads(self.to_qkv.forward_shard(h, 2))

    def q(self, h: torch.Tensor) -> torch.Tensor:
        """Normed queries (B, n, H_local, d); self-attention computes the q rows of the fused GEMM
        alone (two-pass attention: the queries of one chunk after every token's K/V)."""
        q = self.to_qkv.forward_shard(h, 0) if self.is_self else self.to_q(h)
        return self._heads(self.q_norm(q))

    def kv(self, c: torch.Tensor):
        """Normed keys and values (B, n, H_local, d) of `c`: the context, or for self-attention the
        stream itself (the k and v rows of the fused GEMM, in one GEMM). Under TP the k norm
        all-reduces the squares of k alone (tokens x 1)."""
        k, v = self.to_qkv.forward_shards(c, 1, 3) if self.is_self else self.to_kv(c)
        return self._heads(self.k_norm(k)), self._heads(v)

    def gates(self, h: torch.Tensor) -> torch.Tensor | None:
        """Per-head output gates 2*sigmoid(logits) (zero-initialised logits give identity)."""
        if self.to_gate_logits is None:
            return None
        return 2.0 * torch.sigmoid(self.to_gate_logits(h))

    def out(self, o: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """o (B, n, H_local, d) -> (B, n, query_dim), all-reduced over TP."""
        return self.out_start(o, gates).wait()

    def out_start(self, o: torch.Tensor, gates: torch.Tensor | None) -> Pending:
        """`out` with the all-reduce left in flight (RowParallelLinear.start)."""
        if gates is not None:
            o = o * gates.unsqueeze(-1)
        return self.to_out[0].start(o.flatten(-2))
