"""A dispatch-mode probe of what a forward keeps alive: every tensor an aten op returns is recorded,
and a storage counts from the op that allocates it until the last tensor viewing it is freed
(weakref finalizers). Storages that existed before the probe (weights, inputs, pooled host
buffers) and their views are not counted. What kernels allocate internally and free before
returning (workspaces) is not seen; on a GPU the caching allocator adds its rounding.

    with LiveTensors() as probe:
        model(video, audio, plan=plan)
    probe.peak            # the most bytes alive at once
    probe.largest_live()  # the largest storage alive at the peak, and its op
    probe.max_big(bound)  # the most storages larger than `bound` bytes alive at any one time
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    def __init__(self, big: int | None = None):
        super().__init__()
        self.storages: dict[int, list] = {}  # storage ptr -> [nbytes, live tensors, op]
        self.tracked: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.now = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []
        self.big, self.big_now, self.big_max, self.big_ops = big, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs, f"{func}{tuple(t.shape)}")
        return out

    def _track(self, t: torch.Tensor, inputs: set[int], op: str) -> None:
        if self.tracked.get(id(t)) is t:
            return
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0:
            return
        rec = self.storages.get(ptr)
        if rec is None:
            if ptr in inputs:  # a view of something that existed before the probe
                return
            rec = self.storages[ptr] = [nbytes, 0, op]
            self.now += nbytes
            if self.big is not None and nbytes > self.big:
                self.big_now += 1
                if self.big_now > self.big_max:
                    self.big_max, self.big_ops = self.big_now, self._big_list()
            if self.now > self.peak:
                self.peak = self.now
                self.at_peak = sorted(((r[0], r[2]) for r in self.storages.values()), reverse=True)
        rec[1] += 1
        self.tracked[id(t)] = t
        weakref.finalize(t, self._release, ptr)

    def _big_list(self):
        return sorted((r[0], r[2]) for r in self.storages.values() if r[0] > self.big)

    def _release(self, ptr: int) -> None:
        rec = self.storages.get(ptr)
        if rec is None:
            return
        rec[1] -= 1
        if rec[1] == 0:
            del self.storages[ptr]
            self.now -= rec[0]
            if self.big is not None and rec[0] > self.big:
                self.big_now -= 1

    def largest_live(self) -> tuple[int, str]:
        return self.at_peak[0] if self.at_peak else (0, "")
