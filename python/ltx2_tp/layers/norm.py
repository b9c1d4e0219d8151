"""RMSNorm over the stream (no affine) and qk RMSNorm that stays exact when heads are sharded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltx2_tp.distributed.collectives import all_reduce_sum
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.weight_loading import CheckpointEntry, expect_shape


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over the full inner dim (all heads) while this rank holds inner_dim / tp of it.

    LTX-2 normalises q and k over H*d, not per head, so under TP the mean of squares is an
    all-reduced sum: exact, at the cost of one (tokens x 1) all-reduce.
    """

    def __init__(self, full_dim: int, eps: float, ctx: ParallelContext = SINGLE):
        super().__init__()
        self.full_dim, self.eps, self.ctx = full_dim, eps, ctx
        self.local_dim = full_dim // ctx.tp_size
        self.weight = nn.Parameter(torch.empty(self.local_dim))

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        expect_shape(loaded.shape, (self.full_dim,))
        param.data.copy_(loaded.narrow(0, self.ctx.tp_rank * self.local_dim, self.local_dim))

    def checkpoint_spec(self, name: str) -> dict[str, CheckpointEntry]:
        return {f"{name}.weight": CheckpointEntry(self.weight, self.weight_loader, None, (self.full_dim,), self)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.rms_norm(x, (self.full_dim,), self.weight, self.eps)
        xf = x.float()
        ss = all_reduce_sum(xf.pow(2).sum(-1, keepdim=True), self.ctx.tp_group)
        return self._scale(xf, ss, x.dtype)

    def _scale(self, xf: torch.Tensor, ss: torch.Tensor, dtype) -> torch.Tensor:
        return (xf * torch.rsqrt(ss / self.full_dim + self.eps)).to(dtype) * self.weight


def rms_norm_pair(q_norm: ShardedRMSNorm, k_norm: ShardedRMSNorm, q: torch.Tensor, k: torch.Tensor):
    """q_norm(q), k_norm(k) for q and k of the same tokens, with one all-reduce for both sums of
    squares instead of two (each is a latency-bound tokens x 1 collective)."""
    if q_norm.ctx.tp_size == 1:
        return q_norm(q), k_norm(k)
    qf, kf = q.float(), k.float()
    ss = torch.cat([qf.pow(2).sum(-1, keepdim=True), kf.pow(2).sum(-1, keepdim=True)], dim=-1)
    ss = all_reduce_sum(ss, q_norm.ctx.tp_group)
    return q_norm._scale(qf, ss[..., :1], q.dtype), k_norm._scale(kf, ss[..., 1:], k.dtype)
