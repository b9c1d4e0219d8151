"""What checkpoint loading needs from a layer: for each checkpoint key, the tensor to fill, the
loader that fills it (a sharded layer's own, which keeps this rank's part) and the full shape the
checkpoint must hold. Layers that shard describe themselves (`checkpoint_spec(name)`); every other
parameter loads whole with `default_weight_loader`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class CheckpointEntry(NamedTuple):
    param: torch.Tensor  # the tensor this rank fills
    loader: Callable  # loader(param, full_checkpoint_tensor[, shard])
    shard: int | None  # shard id of a merged layer (to_q / to_k / to_v of one fused to_qkv)
    shape: tuple[int, ...]  # the full tensor's shape in the checkpoint
    owner: nn.Module | None = None  # the layer holding `param`


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    expect_shape(loaded.shape, param.shape)
    param.data.copy_(loaded)


def expect_shape(got, shape) -> None:
    if tuple(got) != tuple(shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(got)} vs expected {tuple(shape)}")
