"""An ordering harness for memory/offload.py on the CPU: a stand-in for `_Transfers` whose side-stream
copies run as late as the code's events allow, so a missing event shows as a wrong number.

On the GPU the compute stream and the two copy streams (h2d, d2h) run concurrently, ordered only by
the events the code records and waits for. On the CPU `_Transfers` copies synchronously, so every
ordering bug is invisible there. `DeferredTransfers` models the other extreme:
- the compute stream executes in order, immediately (the host's program order);
- each side stream is a queue: a copy runs only when an event covering it is waited for (by the
  compute stream, or by a copy on the other side stream that depends on it), after the copies it
  waits for (`after`) ran; anything never waited for never runs;
- a staging slot (`slot`) starts as NaN, and the rows a copy in will fill are NaN from the moment
  the copy is enqueued (after the copies it waits for ran: on the GPU it may run at once) until it
  runs (when waited for): a compute read of a slot whose fill was not waited for, or of the previous
  chunk after its refill was issued, gives NaN; a copy back that runs after the refill it should
  have preceded gives a wrong number;
- a slot is memory the allocator hands out in compute-stream order: its previous owner's kernels may
  still be queued on the compute stream. A side-stream copy may write it only once its stream is
  ordered after the compute stream's position at allocation; any other write is recorded in
  `violations` (on CPU the memory is fresh, so no number would show it).
Install with `install(monkeypatch)`; the test asserts `violations == []` and the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ltx2_tp.memory import offload

SIDE = ("h2d", "d2h")


@dataclass(frozen=True)
class Event:
    stream: str  # "compute", "h2d", "d2h"
    index: int  # compute: the tick; side: the number of copies enqueued on it when recorded
    horizon: int  # the compute tick the recording stream was ordered after


@dataclass
class _Copy:
    pairs: list
    deps: list = field(default_factory=list)  # side events to run first
    stream: str = ""


class DeferredTransfers:
    """`_Transfers`' interface with deferred side-stream copies (see the module docstring)."""

    cuda = False

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.tick = 0  # the compute stream's position
        self.queue = {s: [] for s in SIDE}  # every copy enqueued, per stream
        self.ran = {s: 0 for s in SIDE}  # how many of them ran
        self.horizon = {s: 0 for s in SIDE}  # the compute tick each stream is ordered after (enqueue order)
        # storage ptr -> (slot, allocation tick); holding the slot keeps its pointer unique
        self.slots: dict[int, tuple[torch.Tensor, int]] = {}
        self.violations: list[str] = []
        self.copies = 0

    # ---- events ----
    def _compute_event(self) -> Event:
        self.tick += 1
        return Event("compute", self.tick, self.tick)

    def now(self, stream=None) -> Event:
        if stream is None:
            return self._compute_event()
        return Event(stream, len(self.queue[stream]), self.horizon[stream])

    def _order_after(self, stream: str, ev: Event | None, deps: list) -> None:
        if ev is None:
            return
        self.horizon[stream] = max(self.horizon[stream], ev.horizon)
        if ev.stream in SIDE and ev.stream != stream:
            deps.append(ev)

    def _run(self, ev: Event) -> None:
        """Run `ev.stream`'s copies up to the event (and, first, whatever each one waits for)."""
        s = ev.stream
        while self.ran[s] < ev.index:
            op = self.queue[s][self.ran[s]]
            self.ran[s] += 1
            for dep in op.deps:
                self._run(dep)
            for dst, src in op.pairs:
                dst.copy_(src)

    # ---- _Transfers' interface ----
    def fence(self) -> None:
        h, d = self.now("h2d"), self.now("d2h")
        self._barrier("h2d", d)
        self._barrier("d2h", h)

    def _barrier(self, stream: str, ev: Event) -> None:
        deps: list = []
        self._order_after(stream, ev, deps)
        self.queue[stream].append(_Copy([], deps, stream))

    def copy(self, pairs, to_device: bool, after=()) -> Event:
        stream = "h2d" if to_device else "d2h"
        deps: list = []
        for ev in after:
            self._order_after(stream, ev, deps)
        for dst, _ in pairs:
            slot = self._slot_of(dst)
            if slot is not None and slot[1] > self.horizon[stream]:
                self.violations.append(
                    f"copy #{self.copies} on {stream} writes a slot allocated at compute tick {slot[1]} while the "
                    f"stream is ordered only after tick {self.horizon[stream]}: the slot's memory may still be a "
                    "compute-stream tensor whose kernels are queued")
        self.copies += 1
        for dep in deps:  # what the copy waits for runs first; then its rows are up for grabs
            self._run(dep)
        for dst, _ in pairs:
            if self._slot_of(dst) is not None:
                dst.fill_(float("nan"))
        self.queue[stream].append(_Copy(list(pairs), deps, stream))
        return self.now(stream)

    def wait(self, ev) -> None:
        if ev is not None and ev.stream in SIDE:
            self._run(ev)

    def keep_until_copied(self, t: torch.Tensor) -> None:
        pass  # Python references keep it alive on the CPU

    def slot(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.full((numel,), float("nan"), dtype=dtype, device=self.device)
        self.tick += 1
        self.slots[t.untyped_storage().data_ptr()] = (t, self.tick)
        return t

    def _slot_of(self, t: torch.Tensor):
        return self.slots.get(t.untyped_storage().data_ptr())


def install(monkeypatch, device: torch.device = torch.device("cpu")) -> DeferredTransfers:
    """Route every offload walk on `device` through a fresh DeferredTransfers (and fresh host buffers)."""
    fake = DeferredTransfers(device)
    monkeypatch.setattr(offload._Transfers, "_by_device", {torch.device(device): fake})
    monkeypatch.setattr(offload, "_POOL", {})
    return fake
