"""FFN: proj_in column-parallel, tanh-GELU on the local shard, proj_out row-parallel on that
shard. One all-reduce per call; the 4x-wide activation is never gathered. Module paths match the checkpoint: ff.net.0.proj.*, ff.net.2.*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltx2_tp.distributed.collectives import Pending
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.linear import ColumnParallelLinear, RowParallelLinear
from ltx2_tp.profiling import nvtx_range


class _ProjIn(nn.Module):
    def __init__(self, dim: int, inner: int, bias: bool, ctx: ParallelContext):
        super().__init__()
        self.proj = ColumnParallelLinear(dim, inner, bias=bias, ctx=ctx)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, bias: bool = True, ctx: ParallelContext = SINGLE):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList(
            [_ProjIn(dim, inner, bias, ctx), nn.Identity(),
             RowParallelLinear(inner, dim, bias=bias, ctx=ctx)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.start(x).wait()

    def start(self, x: torch.Tensor) -> Pending:
        """The FFN with its all-reduce left in flight (RowParallelLinear.start)."""
        with nvtx_range("ffn"):
            return self.net[2].start(F.gelu(self.net[0].proj(x), approximate="tanh"))
