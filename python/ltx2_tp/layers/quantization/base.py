"""How a linear layer's weight is stored and multiplied (vLLM's `LinearMethodBase` shape).

A parallel linear (layers/linear.py) owns its geometry (which rows or columns this rank keeps), its
bias, its weight loader and its communication; the object in `layer.quant_method` owns the weight
tensors and the matmul. The linear layers import only this module, so a new storage (fp8 per row
in layers/fp8.py; fp8 per tensor with static input scales; fp8 storage with bf16 compute; weights
streamed from pinned host memory) is a new method object, not an edit of the layers.

Methods keep no per-layer state: everything lives on the layer, so one instance serves every
layer and a compiled block never specialises on which method object it met.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

OutRows = tuple[int, int]  # (start, length): a range of output rows of this rank's shard


class LinearMethodBase(ABC):
    #: a LoRA delta may be fused into `checkpoint_tensors(layer)["weight"]` (add_lora_, models/ltx2/lora.py)
    supports_lora: bool = True
    #: what to do instead, when not (the refusal names it)
    lora_hint: str = ""
    #: checkpoint tensors holding one scalar per checkpoint weight (an fp8 per-tensor scale): the layer
    #: keeps one per fused shard in a (shards,) tensor, loaded by LinearBase.scalar_loader
    per_shard_scalars: frozenset[str] = frozenset()

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_per_rank: int, out_per_rank: int,
                       dtype: torch.dtype | None = None) -> None:
        """Register on `layer` the tensors `apply` reads, shaped for this rank's shard."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
              out_rows: OutRows | None = None) -> torch.Tensor:
        """x (..., in_per_rank) -> (..., out): all of this rank's output rows, or only `out_rows`
        (then `bias` is this rank's whole bias and only those rows of it are added)."""

    @abstractmethod
    def layer_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors `apply` reads from the layer, by attribute name (block swap moves these)."""

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Checkpoint key suffix -> the tensor the layer's weight loader fills with it."""
        return {"weight": layer.weight}

    def add_lora_(self, layer: nn.Module, weight: torch.Tensor, delta: torch.Tensor,
                  local: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Fuse a LoRA delta into `weight` in place: `weight` is this rank's `checkpoint_tensors(layer)
        ["weight"]` (or a streamed copy of it), `delta` the full-size delta of one checkpoint weight
        in the LoRA's dtype, `local(t)` cuts a full-size tensor to this rank's part (zeros elsewhere)."""
        weight.add_(local(delta.to(weight.dtype)))


def narrow_rows(t: torch.Tensor | None, out_rows: OutRows | None, dim: int = 0) -> torch.Tensor | None:
    """`t` cut to `out_rows` along `dim` (a view); unchanged when there is no range or no tensor."""
    if t is None or out_rows is None:
        return t
    return t.narrow(dim, *out_rows)


class UnquantizedLinearMethod(LinearMethodBase):
    """The weight in the model's dtype (bf16 / fp32), one F.linear."""

    def create_weights(self, layer, in_per_rank, out_per_rank, dtype=None):
        layer.weight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=dtype))

    def apply(self, layer, x, bias=None, out_rows=None):
        return F.linear(x, narrow_rows(layer.weight, out_rows), narrow_rows(bias, out_rows))

    def layer_tensors(self, layer):
        return {"weight": layer.weight}


UNQUANTIZED = UnquantizedLinearMethod()
