"""Where a step's sequence-long activations live: on the device, or parked in pinned host memory.

Two things grow with the video: the residual stream (B, n, D) and self-attention's keys and
values (B, N, H, d) each. Everything else a block makes is one token chunk at a time (the plan's
chunk sizes). Resident (the default), both are device tensors: `DeviceRows` and `DeviceKeyValues`.
The plan's offload tier parks them in pinned host memory instead:

- `HostTokens` (plan.residual_offload): the video residual. Every sub-layer walks it chunk by
  chunk (`rows(x, chunks).load / .store`): chunk i+1 is copied in on a side stream while chunk i
  computes, and each updated chunk is copied back on another. Three device chunk slots.
- `HostKeyValues` (plan.kv_offload): self-attention's K/V, written back chunk by chunk in the first
  pass; each query chunk of the second pass attends to them block by block (`kv_block_tokens`),
  block j+1 copied in while block j attends, the partial results merged by log-sum-exp in fp32
  (the ring's LseAccumulator). Two device block slots.

Bytes moved per block and step (19B, 1920x1088x1441, 369,240 tokens, bf16: one hidden-size copy is
3.0 GB): the residual ~9 copies (5 in, 4 out: 27 GB, 0.6 s at 46.6 GB/s against ~4.3 s of compute
per block); K/V out once (6 GB) and in once per query chunk (6 GB x chunks): with 32K-token query
chunks 12 x 6 GB = 72 GB, 1.5 s, still under the block's attention. K/V traffic over attention time
is about (H100 attention 500 TFLOP/s) / (46.6 GB/s x query chunk): hidden when query chunks hold
>= 16K tokens, which is what the plan's chunk sizes must keep.

On the CPU (tests) host and device are the same memory: the copies run synchronously, the same
code paths and the same arithmetic, so the offloaded residual gives bit-identical results and the
offloaded K/V equal attention over all keys up to the fp32 merge (test_activation_memory.py).
Ordering on the GPU: a slot is filled only after the event of its last reader (compute, or the
copy back), and its first fill after the compute work issued before it was allocated (the caching
allocator hands out memory in compute-stream order: a side-stream copy into a fresh slot that skips
this overwrote a compute tensor still in use: rel err 0.97 at 1920x1088x2881); the compute stream
waits on a copy's event before reading; a tensor copied back from the compute stream is kept from
reuse by record_stream. Buffers of host memory are pooled per role and reused across blocks and
steps; before a new user writes one, the side streams wait for every transfer queued so far.
test_offload_ordering.py checks this ordering on the CPU with deferred copies.
"""

from __future__ import annotations

import torch

from ltx2_tp.layers.attention_backend import LseAccumulator, attention, attention_lse
from ltx2_tp.memory.host import HostBuffer
from ltx2_tp.memory.plan import token_chunks
from ltx2_tp.profiling import nvtx_range


# ---- side streams; synchronous stand-ins on the CPU ----------------------------------------------
class _Transfers:
    """One pair of copy streams per device (host->device, device->host: the copy engines run both
    directions at once)."""

    _by_device: dict[torch.device, "_Transfers"] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None

    @classmethod
    def of(cls, device: torch.device) -> "_Transfers":
        if device not in cls._by_device:
            cls._by_device[device] = cls(device)
        return cls._by_device[device]

    def now(self, stream=None):
        """An event after everything issued so far on `stream` (default: the compute stream)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream or torch.cuda.current_stream(self.device))
        return ev

    def fence(self) -> None:
        """Both side streams wait for each other's queued copies (a pooled host buffer changes user)."""
        if self.cuda:
            self.h2d.wait_stream(self.d2h)
            self.d2h.wait_stream(self.h2d)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], to_device: bool, after=()):
        """dst.copy_(src) for each pair on the side stream of that direction, once the events `after`
        have passed; returns the event of the copies (None on the CPU, where they are done)."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        stream = self.h2d if to_device else self.d2h
        with torch.cuda.stream(stream):
            for ev in after:
                if ev is not None:
                    stream.wait_event(ev)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        return self.now(stream)

    def wait(self, ev) -> None:
        """The compute stream waits for `ev` (the host does not)."""
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def keep_until_copied(self, t: torch.Tensor) -> None:
        """`t`, made on the compute stream and read by a copy back, is not reused before that copy ran."""
        if self.cuda:
            t.record_stream(self.d2h)

    def slot(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A device staging buffer that both side streams use: when it is freed, the allocator waits
        for every copy queued on them so far (a copy back still reading it, or a prefetch still
        writing it, when its owner is dropped) before it hands the memory out again."""
        t = torch.empty(numel, dtype=dtype, device=self.device)
        if self.cuda:
            t.record_stream(self.h2d)
            t.record_stream(self.d2h)
        return t


_POOL: dict[tuple[str, torch.device], HostBuffer] = {}


def _host_tensor(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pooled pinned host memory for `role` (regrown when too small): cudaHostRegister costs about
    as much as a copy of the same size, too much to pay per block."""
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    buf = _POOL.get((role, device))
    if buf is None or buf.tensor.numel() < nbytes:
        if buf is not None and device.type == "cuda":  # queued copies may still use the old one (once per growth)
            torch.cuda.synchronize(device)
        _POOL.pop((role, device), None)
        buf = _POOL[(role, device)] = HostBuffer(nbytes, pin=device.type == "cuda")
    _Transfers.of(device).fence()
    return buf.tensor[:nbytes].view(dtype).view(shape)


def release_host_memory() -> None:
    """Unpin and free the pooled host buffers (they are kept between steps)."""
    for d in {d for _, d in _POOL}:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    _POOL.clear()


def _rows_pairs(dst: torch.Tensor, src: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch element: rows of a (B, n, ...) host tensor are contiguous only within one element."""
    return [(dst[b], src[b]) for b in range(dst.shape[0])]


# ---- the residual stream --------------------------------------------------------------------------
class DeviceRows:
    """A walk over a device-resident residual: chunks are views, updated in place."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def load(self, s: int, e: int) -> torch.Tensor:
        return self.x[:, s:e]

    def store(self, s: int, e: int, xc: torch.Tensor) -> None:
        pass


class HostTokens:
    """A (B, n, D) token tensor parked in pinned host memory (the video residual under
    plan.residual_offload). `shape`, `dtype` and `device` (where its chunks compute) as a tensor's."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, role: str = "residual"):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)
        self.host = _host_tensor(role, tuple(shape), dtype, self.device)
        self.transfers = _Transfers.of(self.device)
        self.written = None  # event of the last copy back

    def walk(self, chunks: list[tuple[int, int]], write: bool) -> "_HostWalk":
        return _HostWalk(self, chunks, write)

    def write(self, s: int, e: int, xc: torch.Tensor) -> None:
        """Tokens [s, e) <- xc (a device chunk no one writes afterwards: _prepare's patchify)."""
        xc = xc.contiguous()
        self.transfers.keep_until_copied(xc)
        self.written = self.transfers.copy(_rows_pairs(self.host[:, s:e], xc), False, (self.transfers.now(),))


class _HostWalk:
    """load(s, e) -> the device chunk (the next one is copied in meanwhile); with `write`,
    store(s, e, xc) copies each updated chunk back. Chunks are loaded in the order given."""

    def __init__(self, tokens: HostTokens, chunks: list[tuple[int, int]], write: bool):
        self.t, self.chunks, self.write = tokens, chunks, write
        b, _, d = tokens.shape
        longest = max((e - s for s, e in chunks), default=0)
        # reading: the current chunk and the next; updating: also the one being completed (add_residual
        # completes each chunk after the next one was issued, and its copy back reads the slot)
        slots = 3 if write else 2
        self.slots = [tokens.transfers.slot(b * longest * d, tokens.dtype) for _ in range(min(slots, len(chunks)))]
        # event: the slot's last reader is done; at first, the compute stream's work so far (fresh slots
        # are memory the allocator took back from compute tensors whose kernels may still be queued)
        self.free = [tokens.transfers.now()] * len(self.slots)
        self.before = tokens.written  # copies in wait for the previous walk's copies back
        self.ready: dict[int, tuple[torch.Tensor, object]] = {}
        self.next = 0  # the chunk load() expects
        self._prefetch(0)

    def _view(self, i: int) -> torch.Tensor:
        s, e = self.chunks[i]
        b, _, d = self.t.shape
        return self.slots[i % len(self.slots)][: b * (e - s) * d].view(b, e - s, d)

    def _prefetch(self, i: int) -> None:
        if i < len(self.chunks):
            s, e = self.chunks[i]
            dst = self._view(i)
            ev = self.t.transfers.copy(_rows_pairs(dst, self.t.host[:, s:e]), True,
                                       (self.free[i % len(self.slots)], self.before))
            self.ready[i] = (dst, ev)

    def load(self, s: int, e: int) -> torch.Tensor:
        if not self.chunks:  # no tokens here (an SP rank holding none still joins the collectives)
            return torch.empty(self.t.shape[0], 0, self.t.shape[2], dtype=self.t.dtype, device=self.t.device)
        i = self.next
        assert self.chunks[i] == (s, e), f"chunk {(s, e)} loaded out of order (expected {self.chunks[i]})"
        self.next += 1
        if i >= 1 and not self.write:  # the reader moved on from chunk i-1: its slot may refill
            self.free[(i - 1) % len(self.slots)] = self.t.transfers.now()
        self._prefetch(i + 1)
        xc, ev = self.ready.pop(i)
        self.t.transfers.wait(ev)
        return xc

    def store(self, s: int, e: int, xc: torch.Tensor) -> None:
        i = self.chunks.index((s, e))
        ev = self.t.transfers.copy(_rows_pairs(self.t.host[:, s:e], xc), False, (self.t.transfers.now(),))
        self.t.written = self.free[i % len(self.slots)] = ev


def rows(x, chunks: list[tuple[int, int]], write: bool = False):
    """A walk over the residual `x` in `chunks`: `load(s, e)` gives the chunk (a view of a resident
    tensor; a device copy of a parked one); with `write`, `store(s, e, chunk)` keeps its in-place
    update (add_residual stores each chunk one chunk late, after the next one was loaded)."""
    return x.walk(chunks, write) if isinstance(x, HostTokens) else DeviceRows(x)


# ---- self-attention keys and values ----------------------------------------------------------------
class DeviceKeyValues:
    """K and V (B, n, H, d) of every token, on the device; attention in one kernel per query chunk."""

    def __init__(self, b: int, n: int, h: int, d: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.empty(b, n, h, d, dtype=dtype, device=device)
        self.v = torch.empty(b, n, h, d, dtype=dtype, device=device)

    def write(self, s: int, e: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[:, s:e] = k
        self.v[:, s:e] = v

    def attend(self, q: torch.Tensor, heads: slice | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, m, H', d) against every key, of the heads `heads` (None: all)."""
        k, v = (self.k, self.v) if heads is None else (self.k[:, :, heads], self.v[:, :, heads])
        return attention(q, k, v, mask)


class HostKeyValues:
    """K and V parked in pinned host memory, attended to block by block (see the module docstring)."""

    def __init__(self, b: int, n: int, h: int, d: int, dtype: torch.dtype, device: torch.device,
                 block_tokens: int | None):
        self.device = torch.device(device)
        self.host = _host_tensor("kv", (2, b, n, h, d), dtype, self.device)
        self.transfers = _Transfers.of(self.device)
        self.blocks = token_chunks(n, block_tokens)
        longest = max((e - s for s, e in self.blocks), default=0)
        self.slots = [self.transfers.slot(2 * b * longest * h * d, dtype) for _ in range(min(2, len(self.blocks)))]
        self.slot_of: dict[int, int] = {}  # block -> the slot holding it (or receiving it)
        self.turn = 0  # fetches alternate slots
        # event: the slot's last attention is done; at first, the compute work so far (as _HostWalk's)
        self.free = [self.transfers.now()] * len(self.slots)
        self.written = None
        self.pending: dict[int, object] = {}  # block -> its copy's event

    def write(self, s: int, e: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.contiguous(), v.contiguous()
        for t in (k, v):
            self.transfers.keep_until_copied(t)
        pairs = _rows_pairs(self.host[0, :, s:e], k) + _rows_pairs(self.host[1, :, s:e], v)
        self.written = self.transfers.copy(pairs, False, (self.transfers.now(),))

    def _view(self, j: int) -> torch.Tensor:
        s, e = self.blocks[j]
        _, b, _, h, d = self.host.shape
        return self.slots[self.slot_of[j]][: 2 * b * (e - s) * h * d].view(2, b, e - s, h, d)

    def _fetch(self, j: int) -> None:
        if j in self.slot_of:  # held (every block fits the slots: copied once) or on its way
            return
        slot = self.turn % len(self.slots)
        self.turn += 1
        self.slot_of = {blk: sl for blk, sl in self.slot_of.items() if sl != slot}
        self.slot_of[j] = slot
        s, e = self.blocks[j]
        dst = self._view(j)
        pairs = _rows_pairs(dst[0], self.host[0, :, s:e]) + _rows_pairs(dst[1], self.host[1, :, s:e])
        self.pending[j] = self.transfers.copy(pairs, True, (self.free[slot], self.written))

    def attend(self, q: torch.Tensor, heads: slice | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("kv_offload with a self-attention mask (Modality.attention_mask)")
        if not self.blocks:
            return torch.zeros_like(q)
        with nvtx_range("attention_streamed_kv"):
            acc = LseAccumulator()
            nb = len(self.blocks)
            self._fetch(0)
            for j in range(nb):
                self._fetch((j + 1) % nb)  # the next block (the next query chunk's first, after the last)
                self.transfers.wait(self.pending.pop(j, None))
                kv = self._view(j)
                k, v = (kv[0], kv[1]) if heads is None else (kv[0][:, :, heads], kv[1][:, :, heads])
                acc.add(*attention_lse(q, k, v))
                self.free[self.slot_of[j]] = self.transfers.now()
            return acc.out.to(q.dtype)


def key_values(offload: bool, block_tokens: int | None, b: int, n: int, h: int, d: int, dtype: torch.dtype,
               device: torch.device):
    """Where self-attention's K/V of n tokens live: parked in host memory (`offload`, streamed back
    in blocks of `block_tokens`) or on the device."""
    if offload:
        return HostKeyValues(b, n, h, d, dtype, device, block_tokens)
    return DeviceKeyValues(b, n, h, d, dtype, device)
