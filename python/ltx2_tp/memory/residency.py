"""Where a transformer block's weights are while it runs: the protocol the model's block loop calls.

This base is the default: every block is resident on its device, so both calls do nothing.
memory/swap.py's BlockSwap streams some blocks in from host memory or the checkpoint file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

_NULL = contextlib.nullcontext()


class BlockResidency:
    def loaded(self, i: int) -> contextlib.AbstractContextManager:
        """Block i's weights are on the device inside this context (the model runs block i in it)."""
        return _NULL

    def add_delta(self, tensor: torch.Tensor, fuse: Callable[..., None],
                  inputs: tuple[torch.Tensor, ...]) -> bool:
        """Call `fuse(copy, *inputs on the device)` (which updates `copy` in place: a LoRA delta
        added) on each device copy of `tensor` its block is streamed into, until clear_deltas();
        False when `tensor` is resident (the caller then fuses it in place)."""
        return False

    def clear_deltas(self) -> None:
        pass


ALL_RESIDENT = BlockResidency()
