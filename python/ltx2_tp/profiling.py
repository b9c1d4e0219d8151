"""NVTX ranges for Nsight Systems: free when profiling is off.

Ranges are emitted only when LTX2_TP_NVTX=1 (benchmark/profile_nsys.sh sets it) and CUDA is
available; otherwise `nvtx_range` returns a shared null context, so the hot path pays one
attribute lookup.
"""

from __future__ import annotations

import contextlib
import os

import torch

_ENABLED = os.environ.get("LTX2_TP_NVTX", "0") == "1" and torch.cuda.is_available()
_NULL = contextlib.nullcontext()


def set_nvtx(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = bool(enabled) and torch.cuda.is_available()


def nvtx_enabled() -> bool:
    return _ENABLED


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()
        return False


def nvtx_range(name: str, *suffix):
    """`suffix` (e.g. a block index) is formatted only when ranges are on: an f-string at the call
    site would make torch.compile specialise every block on its index (one graph per block)."""
    if not _ENABLED:
        return _NULL
    return _Range(name + "".join(str(s) for s in suffix))
