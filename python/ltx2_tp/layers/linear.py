"""Tensor-parallel linear layers (Megatron / vLLM style). Each owns its weight loader:
`layer.weight_loader(param, full_checkpoint_tensor[, shard_id])` keeps only this rank's shard,
so the checkpoint loader never needs to know the sharding scheme.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ltx2_tp.distributed.collectives import Pending, all_reduce_sum_start
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.fp8 import linear as _linear


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _expect(got, shape: tuple[int, ...]) -> None:
    if tuple(got) != tuple(shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(got)} vs expected full shape {tuple(shape)}")


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; each rank keeps out_features / tp outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 ctx: ParallelContext = SINGLE):
        super().__init__()
        if out_features % ctx.tp_size:
            raise ValueError(f"tp_size={ctx.tp_size} must divide out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.ctx = gather_output, ctx
        self.out_per_rank = out_features // ctx.tp_size
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_per_rank)) if bias else None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        _expect(loaded.shape[:1], (self.out_features,))
        n = self.out_per_rank
        param.data.copy_(loaded.narrow(0, self.ctx.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(self, x, self.bias)
        if self.gather_output and self.ctx.tp_size > 1:
            parts = [torch.empty_like(y) for _ in range(self.ctx.tp_size)]
            dist.all_gather(parts, y.contiguous(), group=self.ctx.tp_group)
            y = torch.cat(parts, dim=-1)
        return y


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel projections of one input fused into one GEMM (QKV).

    Checkpoint tensors arrive separately (to_q, to_k, to_v); `weight_loader(param, t, shard_id)`
    writes shard `shard_id` of each at its offset. forward returns the per-projection outputs.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True, ctx: ParallelContext = SINGLE):
        super().__init__()
        for s in output_sizes:
            if s % ctx.tp_size:
                raise ValueError(f"tp_size={ctx.tp_size} must divide output size {s}")
        self.ctx, self.in_features, self.output_sizes = ctx, in_features, list(output_sizes)
        self.local_sizes = [s // ctx.tp_size for s in output_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes))) if bias else None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int) -> None:
        _expect(loaded.shape[:1], (self.output_sizes[shard_id],))
        n = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, self.ctx.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _linear(self, x, self.bias).split(self.local_sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = sum_ranks(x_r W_r^T) + b with W split by input columns: one all-reduce per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 ctx: ParallelContext = SINGLE):
        super().__init__()
        if in_features % ctx.tp_size:
            raise ValueError(f"tp_size={ctx.tp_size} must divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.ctx = input_is_parallel, ctx
        self.in_per_rank = in_features // ctx.tp_size
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        _expect(loaded.shape, (self.out_features, self.in_features))
        n = self.in_per_rank
        param.data.copy_(loaded.narrow(1, self.ctx.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.start(x).wait()

    def start(self, x: torch.Tensor) -> Pending:
        """The GEMM now, its all-reduce in flight: `.wait()` gives the output. Callers that walk
        tokens in chunks wait one chunk later, so the all-reduce overlaps the next chunk's GEMMs."""
        if self.ctx.tp_size == 1:
            y = _linear(self, x, self.bias)
            return Pending(None, lambda: y)
        if not self.input_is_parallel:
            x = x.narrow(-1, self.ctx.tp_rank * self.in_per_rank, self.in_per_rank)
        p = all_reduce_sum_start(_linear(self, x, None), self.ctx.tp_group)
        if self.bias is None:
            return p
        return Pending(p.work, lambda: p.finish() + self.bias)
