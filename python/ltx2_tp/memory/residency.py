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

    def add_delta(self, tensor: torch.Tensor, delta: Callable[..., torch.Tensor],
                  inputs: tuple[torch.Tensor, ...]) -> bool:
        """Add `delta(*inputs on the device)` to `tensor` each time its block is streamed in, until
        clear_deltas(); False when `tensor` is resident (the caller then adds it in place)."""
        return False

    def clear_deltas(self) -> None:
        pass


ALL_RESIDENT = BlockResidency()
