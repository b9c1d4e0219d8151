"""Tensor-parallel linear layers (Megatron / vLLM shape).

`LinearBase` holds what the three share: a bias, and the `quant_method` object
(layers/quantization/base.py) that owns the weight tensors and the matmul. Each subclass adds its
geometry (which rows or columns this rank keeps), its communication, and so its weight loader:
`weight_loader(param, full_checkpoint_tensor[, shard_id])` keeps only this rank's part, and
`checkpoint_spec(name)` names the checkpoint tensors the layer takes, so checkpoint loading never
needs to know the sharding scheme. Nothing outside a layer and its method reads the weight: a
caller that needs some output rows asks for them (`MergedColumnParallelLinear.forward_shard`).
"""

from __future__ import annotations

import torch
from torch import nn

from ltx2_tp.distributed.collectives import Pending, all_reduce_sum_start
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.quantization.base import UNQUANTIZED, LinearMethodBase, OutRows
from ltx2_tp.layers.weight_loading import CheckpointEntry, default_weight_loader, expect_shape


def _divides(tp_size: int, n: int, name: str) -> int:
    if n % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide {name}={n}")
    return n // tp_size


class LinearBase(nn.Module):
    split_dim = 0  # the weight dimension the TP ranks divide: 0 output rows, 1 input columns

    def __init__(self, in_per_rank: int, out_per_rank: int, bias_size: int | None, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        # bf16 / fp32 at construction; another method converts the layer (e.g. FP8_ROWWISE.quantize)
        self.quant_method: LinearMethodBase = UNQUANTIZED
        self.quant_method.create_weights(self, in_per_rank, out_per_rank)
        self.bias = nn.Parameter(torch.empty(bias_size)) if bias_size else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, out_rows: OutRows | None = None) -> torch.Tensor:
        return self.quant_method.apply(self, x, bias, out_rows)

    def device_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor forward reads, by attribute name: the method's and the bias."""
        tensors = dict(self.quant_method.layer_tensors(self))
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors

    # ---- checkpoint loading ----------------------------------------------------------------
    def _split(self, shard_id: int | None) -> tuple[int, int]:
        """(full size of the checkpoint tensor along split_dim, offset of its part in this rank's tensor)."""
        raise NotImplementedError

    def _full_shape(self, t: torch.Tensor, shard_id: int | None = None) -> tuple[int, ...]:
        shape = list(t.shape)
        if t.ndim > self.split_dim:  # a tensor without the split dim (row-parallel bias) is whole
            shape[self.split_dim] = self._split(shard_id)[0]
        return tuple(shape)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        d = self.split_dim
        if param.ndim <= d:
            return default_weight_loader(param, loaded)
        expect_shape(loaded.shape, self._full_shape(param, shard_id))
        full, offset = self._split(shard_id)
        n = full // self.ctx.tp_size
        param.data.narrow(d, offset, n).copy_(loaded.narrow(d, self.ctx.tp_rank * n, n))

    @staticmethod
    def scalar_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """One checkpoint scalar (an fp8 per-tensor weight_scale / input_scale) into its shard's slot
        of `param` (shards,). Whole on every TP rank: a per-tensor scale holds for any part of its
        tensor. Only the layer knows its shards, so the rule is here (vLLM: adjust_scalar_to_fused_array)."""
        expect_shape(loaded.shape, ())
        param.data[shard_id or 0] = loaded

    def _entries(self, prefix: str, shard_id: int | None = None) -> dict[str, CheckpointEntry]:
        tensors = dict(self.quant_method.checkpoint_tensors(self))
        if self.bias is not None:
            tensors["bias"] = self.bias
        scalars = self.quant_method.per_shard_scalars
        return {f"{prefix}.{k}": (CheckpointEntry(t, self.scalar_loader, shard_id, (), self) if k in scalars else
                                  CheckpointEntry(t, self.weight_loader, shard_id, self._full_shape(t, shard_id), self))
                for k, t in tensors.items()}

    def checkpoint_spec(self, name: str) -> dict[str, CheckpointEntry]:
        """Checkpoint key -> entry, for this layer registered under module name `name`."""
        return self._entries(name)


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W split by output rows; each rank keeps out_features / tp outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ctx: ParallelContext = SINGLE):
        n = _divides(ctx.tp_size, out_features, "out_features")
        super().__init__(in_features, n, n if bias else None, ctx)
        self.in_features, self.out_features = in_features, out_features

    def _split(self, shard_id):
        return self.out_features, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of one input fused into one GEMM (QKV).

    Checkpoint tensors arrive separately (`shard_names`: to_q, to_k, to_v, beside this module);
    `weight_loader(param, t, shard_id)` writes this rank's part of each at its offset. forward
    returns the per-projection outputs; `forward_shard(s)` computes some of them alone (the rows of
    the others are not multiplied).
    """

    def __init__(self, in_features: int, output_sizes: list[int], shard_names: tuple[str, ...], bias: bool = True,
                 ctx: ParallelContext = SINGLE):
        local = [_divides(ctx.tp_size, s, "output size") for s in output_sizes]
        super().__init__(in_features, sum(local), sum(local) if bias else None, ctx)
        self.in_features, self.output_sizes, self.local_sizes = in_features, list(output_sizes), local
        self.shard_names = tuple(shard_names)

    def _split(self, shard_id):
        return self.output_sizes[shard_id], sum(self.local_sizes[:shard_id])

    def checkpoint_spec(self, name: str) -> dict[str, CheckpointEntry]:
        parent = name.rsplit(".", 1)[0]
        spec = {}
        for i, shard in enumerate(self.shard_names):
            spec.update(self._entries(f"{parent}.{shard}", i))
        return spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.matmul(x, self.bias).split(self.local_sizes, dim=-1)

    def forward_shard(self, x: torch.Tensor, shard_id: int) -> torch.Tensor:
        """Projection `shard_id` alone (e.g. v without q and k): only its output rows are computed."""
        return self.forward_shards(x, shard_id, shard_id + 1)[0]

    def forward_shards(self, x: torch.Tensor, first: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Projections first..stop-1 (adjacent rows: k and v) in one GEMM, split as `forward` splits."""
        sizes = self.local_sizes[first:stop]
        y = self.matmul(x, self.bias, out_rows=(sum(self.local_sizes[:first]), sum(sizes)))
        return y.split(sizes, dim=-1) if len(sizes) > 1 else (y,)


class RowParallelLinear(LinearBase):
    """y = sum_ranks(x_r W_r^T) + b with W split by input columns (x arrives split the same way,
    from a column-parallel layer): one all-reduce per call."""

    split_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ctx: ParallelContext = SINGLE):
        n = _divides(ctx.tp_size, in_features, "in_features")
        super().__init__(n, out_features, out_features if bias else None, ctx)
        self.in_features, self.out_features = in_features, out_features

    def _split(self, shard_id):
        return self.in_features, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.start(x).wait()

    def start(self, x: torch.Tensor) -> Pending:
        """The GEMM now, its all-reduce in flight: `.wait()` gives the output. Callers that walk
        tokens in chunks wait one chunk later, so the all-reduce overlaps the next chunk's GEMMs."""
        if self.ctx.tp_size == 1:
            y = self.matmul(x, self.bias)
            return Pending(None, lambda: y)
        p = all_reduce_sum_start(self.matmul(x), self.ctx.tp_group)
        if self.bias is None:
            return p
        return Pending(p.work, lambda: p.finish() + self.bias)
