"""Pinned host memory: the home of what block swap streams (weights) and of parked activations
(memory/offload.py)."""

from __future__ import annotations

import weakref

import torch

PAGE = 4096  # cudaHostRegister pins whole pages: host buffers are page-aligned and page-sized


class HostBuffer:
    """Page-aligned host bytes, pinned with cudaHostRegister when `pin` (pin_memory()'s caching
    allocator rounds every allocation up to a power of two: a 0.77 GB block would take 1.07 GB)."""

    def __init__(self, nbytes: int, pin: bool):
        size = -(-max(nbytes, 1) // PAGE) * PAGE
        base = torch.empty(size + PAGE, dtype=torch.uint8)
        start = (-base.data_ptr()) % PAGE
        self.tensor = base[start:start + nbytes]
        if pin:
            ptr = base.data_ptr() + start
            rc = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
            if rc != 0:
                raise RuntimeError(f"pinning {size / 2**30:.2f} GiB of host memory failed (cudaError {rc})")
            weakref.finalize(self, _unregister, ptr, base)  # keeps `base` alive until unpinned


def _unregister(ptr: int, base: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
