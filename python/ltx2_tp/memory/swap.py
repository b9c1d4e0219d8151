"""Block swap: transformer blocks whose weights live off the GPU and are copied in just ahead of use.

A streamed block's tensors (parameters and buffers: the fp8 weights and their scales once
quantized; under TP this rank's shards, which is all a rank's parameters hold) are laid out in one
flat byte buffer, each at an ALIGN-byte offset. Their home is pinned host memory (source="host"),
or the safetensors checkpoint itself (source="file": read by a reader thread through the layers'
own weight loaders into a pinned staging buffer, for machines with less RAM than weights). Before
block i runs, its bytes are copied in one piece into one of `slots` flat GPU buffers on a side
stream, and every tensor of the block is re-pointed (`tensor.data = view`) at its view in that
slot; after it ran they point home again. Shapes, strides and dtypes never change, so the block is
called exactly as before and a compiled block does not recompile (dynamo guards a parameter's
metadata, not its address; test_swap.py checks it).

Ordering, on the GPU only (s_j: the j-th streamed block of a forward; slot j % slots):
- the copy of s_j waits on the event recorded on the compute stream after the slot's previous
  user (s_{j-slots}, or the last one of the previous forward) finished;
- the compute stream waits on the copy's event before s_j runs.
With 2 slots, s_{j+1}'s copy runs under s_j's compute; resident blocks between streamed ones give
the copies more time. The host thread never waits for the GPU (with source="file" it waits
for the reader thread when reading is slower than compute). Host copies are read while the
forward runs: write a streamed block's home tensors only after synchronizing with its output.

19B model, one rank (block_nbytes): a block streams 0.772 GB in bf16, 0.387 GB with quantize_fp8's
linears = 16.6 / 8.3 ms at 46.6 GB/s (pinned host -> H100). 1920x1088x121 computes 2.86 s / 48 =
60 ms per block, so both hide under compute; 768x512x121 compiled computes 7.2 ms per block, so
neither does, and resident blocks (spread_blocks between the streamed ones) are what hide them.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from ltx2_tp.distributed.context import SINGLE
from ltx2_tp.layers.fp8 import quantize_fp8
from ltx2_tp.memory.host import HostBuffer
from ltx2_tp.memory.residency import ALL_RESIDENT, BlockResidency
from ltx2_tp.layers.weight_loading import CheckpointEntry
from ltx2_tp.models.ltx2.weights import _check, _load_one, _Source, build_model, checkpoint_spec

ALIGN = 512  # bytes: every tensor of a flat block starts here (cuBLAS / _scaled_mm need 16)
SOURCES = ("host", "file")


# ---- layout: one block's tensors in one flat buffer --------------------------------------------
@dataclass(frozen=True)
class Entry:
    module: nn.Module
    name: str
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def current(self) -> torch.Tensor:
        t = self.module._parameters.get(self.name)
        return t if t is not None else self.module._buffers[self.name]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def block_layout(block: nn.Module) -> tuple[list[Entry], int]:
    """Every parameter and buffer of `block` at its offset in a flat buffer, and the buffer's size.
    Works on a meta-device block (shapes and dtypes are all it reads)."""
    entries, off, seen = [], 0, set()
    for mod in block.modules():
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or id(t) in seen:
                continue
            if not t.is_contiguous():
                raise ValueError(f"block swap needs contiguous tensors; {name} of {type(mod).__name__} is not")
            seen.add(id(t))
            entries.append(Entry(mod, name, off, t.shape, t.dtype))
            off = _align(off + t.numel() * t.element_size())
    return entries, off


def block_nbytes(block: nn.Module) -> int:
    """Bytes one block streams (its flat buffer); a meta-device block gives the planner's figure."""
    return block_layout(block)[1]


def resident_set(resident_blocks: int | Iterable[int], num_blocks: int) -> frozenset[int]:
    """`resident_blocks` K -> the first K blocks; a collection -> those block indices."""
    if isinstance(resident_blocks, int):
        if not 0 <= resident_blocks <= num_blocks:
            raise ValueError(f"resident_blocks must be in [0, {num_blocks}] (the model's blocks), got {resident_blocks}")
        return frozenset(range(resident_blocks))
    chosen = frozenset(int(i) for i in resident_blocks)
    bad = sorted(i for i in chosen if not 0 <= i < num_blocks)
    if bad:
        raise ValueError(f"resident_blocks indices must be in [0, {num_blocks - 1}], got {bad}")
    return chosen


def device_nbytes(model: nn.Module, resident_blocks: int | Iterable[int], slots: int = 2) -> int:
    """Device bytes of the transformer blocks' weights with `resident_blocks` resident and the rest
    streamed through `slots` buffers. Works on a meta-device model (quantize_fp8 it first for fp8)."""
    return blocks_device_nbytes([block_nbytes(b) for b in model.transformer_blocks], resident_blocks, slots)


def resident_blocks(model: nn.Module) -> int:
    """How many of the model's blocks stay on the device: all of them without block swap. The planner
    takes this count as the first K (what every builder here makes); only fp8-scaled-mm's bf16 blocks
    (0, 43-47) make other choices of K blocks differ in bytes."""
    swap = getattr(model, "residency", None)
    return len(swap.resident) if isinstance(swap, BlockSwap) else len(model.transformer_blocks)


def blocks_device_nbytes(sizes: list[int], resident_blocks: int | Iterable[int], slots: int = 2) -> int:
    """device_nbytes from each block's flat size (block_nbytes; the planner: weights_estimate.py):
    the resident blocks whole, plus `slots` buffers of the largest streamed block."""
    resident = resident_set(resident_blocks, len(sizes))
    streamed = [s for i, s in enumerate(sizes) if i not in resident]
    return sum(sizes[i] for i in resident) + (slots * max(streamed) if streamed else 0)


def _views(buf: torch.Tensor, entries: list[Entry]) -> list[torch.Tensor]:
    return [buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in entries]


def _unloaded(e: Entry) -> torch.Tensor:
    """A file-streamed tensor between uses: right shape, no memory, NaN if anything reads it."""
    return torch.full((), float("nan"), dtype=e.dtype).expand(e.shape)


def _set(e: Entry, t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Point the module's tensor at `new`, keeping the object (a meta tensor cannot take
    `.data =` of a real one: it is replaced, before anything holds it). Returns the object."""
    if not t.is_meta:
        t.data = new
        return t
    if e.name in e.module._parameters:
        e.module._parameters[e.name] = nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        e.module._buffers[e.name] = new
    return e.current()


def _to_device(block: nn.Module, device: torch.device) -> None:
    for e in block_layout(block)[0]:
        t = e.current()
        if t.is_meta:
            _set(e, t, torch.empty(e.shape, dtype=e.dtype, device=device))
        elif t.device != device:
            t.data = t.data.to(device)


# ---- the side stream and its events; synchronous stand-ins on the CPU --------------------------
class _Copies:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def record(self):
        """An event after everything issued so far on the current (compute) stream."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, extras: list[torch.Tensor]):
        """dst <- src on the side stream once event `after` has passed, then `extras` (small pinned
        tensors: LoRA factors) to new device tensors; returns (the copies' event, the new tensors)."""
        if not self.cuda:
            dst.copy_(src)
            return None, [x.to(self.device) for x in extras]
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            moved = [x.to(self.device, non_blocking=True) for x in extras]
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev, moved

    def wait(self, ev, used: list[torch.Tensor]) -> None:
        """The compute stream waits for `ev` (the host does not) and will use `used`, allocated on
        the side stream (record_stream: their memory is not reused before the compute stream is past them)."""
        if ev is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ev)
            for x in used:
                x.record_stream(compute)

    def host_wait(self, ev) -> None:
        if ev is not None:
            ev.synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def on_device(self):
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()


# ---- the swapper -------------------------------------------------------------------------------
class BlockSwap(BlockResidency):
    """Blocks not in `resident_blocks` are streamed through `slots` device buffers (see the module
    docstring). Made by enable_block_swap / build_swapped_model; the model calls `loaded(i)`.

    Figures for the planner: block_nbytes (one streamed block), device_nbytes (resident blocks +
    slots), host_nbytes (pinned host memory: every streamed block, or the staging buffers)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, resident_blocks: int | Iterable[int] = 0, source: str = "host",
                 files: list[str] | None = None, device: torch.device | str | None = None, slots: int = 2,
                 trace: bool = False):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "file" and not files:
            raise ValueError("source='file' needs files=[the safetensors checkpoint]")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        blocks = model.transformer_blocks
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.resident = resident_set(resident_blocks, len(blocks))
        self.streamed = tuple(i for i in range(len(blocks)) if i not in self.resident)
        self._position = {b: j for j, b in enumerate(self.streamed)}
        self.source, self.slots = source, slots
        self.trace: list[tuple] | None = [] if trace else None
        self._copies = _Copies(self.device)
        pin = self._copies.cuda
        # Everything is checked and allocated before the model is touched: a refusal or an
        # allocation failure leaves it as it was.
        self._entries: dict[int, list[Entry]] = {}
        self._sizes: dict[int, int] = {}
        for i in self.streamed:
            self._entries[i], self._sizes[i] = block_layout(blocks[i])
        self.block_nbytes = max(self._sizes.values(), default=0)
        n_slots = slots if self.streamed else 0
        self.file_keys: frozenset[str] = frozenset()
        if source == "file":
            self._plan_file_reads(model, files)
        with torch.inference_mode(False):  # views made here are ordinary tensors, whatever the caller's mode
            self._master = {i: HostBuffer(self._sizes[i], pin) for i in self.streamed} if source == "host" else {}
            self._slot_bufs = [torch.empty(self.block_nbytes, dtype=torch.uint8, device=self.device)
                               for _ in range(n_slots)]
            self._staging = [HostBuffer(self.block_nbytes, pin) for _ in range(n_slots)] if source == "file" else []
            self._slot_views = {(i, s): _views(self._slot_bufs[s], self._entries[i])
                                for i in self.streamed for s in range(n_slots)}
            self._staging_views = {(i, s): _views(self._staging[s].tensor, self._entries[i])
                                   for i in self.streamed for s in range(len(self._staging))}
            for i in self.resident:
                _to_device(blocks[i], self.device)
            self._tensors: dict[int, list[torch.Tensor]] = {}
            self._home: dict[int, list[torch.Tensor]] = {}
            for i in self.streamed:
                entries = self._entries[i]
                if source == "host":
                    self._home[i] = _views(self._master[i].tensor, entries)
                    for e, h in zip(entries, self._home[i]):
                        if not e.current().is_meta:
                            h.copy_(e.current())
                else:
                    self._home[i] = [_unloaded(e) for e in entries]
                self._tensors[i] = [_set(e, e.current(), h) for e, h in zip(entries, self._home[i])]
        self._where = {id(t): (i, k) for i in self.streamed for k, t in enumerate(self._tensors[i])}
        self.device_nbytes = sum(block_nbytes(blocks[i]) for i in self.resident) + n_slots * self.block_nbytes
        self.host_nbytes = sum(self._sizes.values()) if source == "host" else n_slots * self.block_nbytes
        self._deltas: dict[int, list[tuple]] = {}
        self._slot_free: list[tuple] = [(None, None)] * n_slots  # (event, block that recorded it)
        self._staging_free = [None] * n_slots  # source="file": event of each staging buffer's last copy
        self._pending: dict[int, object] = {}  # streamed position -> (copy event, LoRA factors), or a Future of it
        self._issued = self._done = 0
        self._last = len(blocks)
        self._executor: ThreadPoolExecutor | None = None

    def _plan_file_reads(self, model: nn.Module, files: list[str]) -> None:
        """Which checkpoint key (and loader) fills which tensor of which streamed block."""
        self._src = _Source(files=files)
        spec = checkpoint_spec(model)
        fp8_in_file = {id(e.param) for key, e in spec.items() if key in self._src.keys()
                       and self._src.dtype(key) == e.param.dtype}  # an fp8 checkpoint's own tensors
        for i in self.streamed:  # quantized in memory (quantize_fp8): the file holds other tensors
            for e in self._entries[i]:
                t = e.current()
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and id(t) not in fp8_in_file:
                    raise ValueError(f"source='file' streams checkpoint tensors only, and block {i}'s {e.name} "
                                     f"({type(e.module).__name__}) is not one (fp8 weights made by quantize_fp8?): "
                                     f"use source='host'")
        _check(spec, self._src)
        where = {id(e.current()): (i, k) for i in self.streamed for k, e in enumerate(self._entries[i])}
        self._keys: dict[int, list[tuple]] = {i: [] for i in self.streamed}
        covered = set()
        for key, (param, loader, shard, *_) in spec.items():
            if id(param) in where:
                i, k = where[id(param)]
                self._keys[i].append((key, k, loader, shard))
                covered.add((i, k))
        for i in self.streamed:
            for k, e in enumerate(self._entries[i]):
                if (i, k) not in covered and e.nbytes:
                    raise ValueError(f"source='file' streams checkpoint tensors only, and block {i}'s {e.name} "
                                     f"({type(e.module).__name__}) is not one (fp8 weights made by quantize_fp8?): "
                                     f"use source='host'")
        self.file_keys = frozenset(key for i in self.streamed for key, *_ in self._keys[i])

    # ---- the protocol the model calls ----------------------------------------------------------
    @contextlib.contextmanager
    def loaded(self, i: int):
        if i <= self._last:  # block indices only grow inside a forward
            self._begin()
        self._last = i
        j = self._position.get(i)
        self._prefetch()
        if j is None:  # resident: the prefetch above keeps copies flowing under its compute
            yield
            return
        slot = j % self.slots
        ready = self._pending.pop(j)
        ready, extras = ready.result() if isinstance(ready, Future) else ready
        self._copies.wait(ready, extras)
        tensors, views = self._tensors[i], self._slot_views[(i, slot)]
        for e, t in zip(self._entries[i], tensors):
            if e.current() is not t:
                raise RuntimeError(f"block {i}'s {e.name} ({type(e.module).__name__}) was replaced after "
                                   f"enable_block_swap (quantize_fp8 after it?): quantize first, then enable block swap")
        for t, v in zip(tensors, views):
            t.data = v
        self._log("run", i, slot)
        try:
            for k, fuse, inputs in self._deltas.get(i, ()):  # a fused LoRA, into this copy only
                fuse(views[k], *extras[:len(inputs)])
                del extras[:len(inputs)]
            yield
        finally:
            self._slot_free[slot] = (self._copies.record(), i)
            for t, h in zip(tensors, self._home[i]):
                t.data = h
            self._done += 1
            self._log("done", i, slot)
            self._prefetch()

    def add_delta(self, tensor, delta, inputs) -> bool:
        where = self._where.get(id(tensor))
        if where is None:
            return False
        pinned = tuple(x.pin_memory() if self._copies.cuda else x for x in inputs)
        self._deltas.setdefault(where[0], []).append((where[1], delta, pinned))
        return True

    def clear_deltas(self) -> None:
        self._deltas = {}

    # ---- scheduling --------------------------------------------------------------------------
    def _begin(self) -> None:
        """A new forward. Copies a stopped forward issued but never used land first (the reader's
        jobs finish); later copies into their slots queue behind them on the side stream."""
        for p in self._pending.values():
            if isinstance(p, Future):
                p.result()
        self._pending.clear()
        self._issued = self._done = 0

    def _prefetch(self) -> None:
        """Issue every copy whose slot's previous user has been issued to the compute stream."""
        while self._issued < len(self.streamed) and self._issued - self._done < self.slots:
            j = self._issued
            i, slot = self.streamed[j], j % self.slots
            if self.source == "host":
                self._pending[j] = self._copy_in(i, slot, self._master[i].tensor)
            else:
                self._pending[j] = self._reader().submit(self._read_in, i, slot)
            self._issued += 1

    def _copy_in(self, i: int, slot: int, src: torch.Tensor):
        after, after_block = self._slot_free[slot]
        self._log("copy", i, slot, after_block)
        extras = [x for _, _, inputs in self._deltas.get(i, ()) for x in inputs]
        return self._copies.copy(self._slot_bufs[slot][:src.numel()], src, after, extras)

    def _read_in(self, i: int, slot: int):
        """Reader thread: block i from the checkpoint into staging buffer `slot`, then its copy."""
        with self._copies.on_device():
            self._copies.host_wait(self._staging_free[slot])  # the staging buffer's last copy is done
            views = self._staging_views[(i, slot)]
            for key, k, loader, shard in self._keys[i]:
                _load_one(CheckpointEntry(views[k], loader, shard, None), self._src.get(key))
            ready = self._copy_in(i, slot, self._staging[slot].tensor[:self._sizes[i]])
            self._staging_free[slot] = ready[0]
            return ready

    def _reader(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ltx2-block-swap-reader")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        return self._executor

    def _log(self, *event) -> None:
        if self.trace is not None:
            self.trace.append(event)

    # ---- back to resident ----------------------------------------------------------------------
    @torch.no_grad()
    def close(self) -> None:
        """Every streamed block back on the device (copied from host, or read from the file)."""
        self._begin()
        self._copies.synchronize()
        with torch.inference_mode(False):
            for i in self.streamed:
                if self.source == "host":
                    for t, h in zip(self._tensors[i], self._home[i]):
                        t.data = h.to(self.device)
                else:
                    for t, e in zip(self._tensors[i], self._entries[i]):
                        t.data = torch.empty(e.shape, dtype=e.dtype, device=self.device)
                    for key, k, loader, shard in self._keys[i]:
                        _load_one(CheckpointEntry(self._tensors[i][k], loader, shard, None), self._src.get(key))
        if self._executor is not None:
            self._executor.shutdown()
        self._deltas, self._slot_bufs, self._slot_views, self._master = {}, [], {}, {}


def _model_device(model: nn.Module) -> torch.device:
    for name, p in model.named_parameters():
        if not name.startswith("transformer_blocks.") and not p.is_meta:
            return p.device
    raise ValueError("block swap: pass device= (the model has no materialised parameter outside its blocks)")


# ---- public API ----------------------------------------------------------------------------------
def enable_block_swap(model: nn.Module, resident_blocks: int | Iterable[int] = 0, source: str = "host",
                      files: list[str] | None = None, device: torch.device | str | None = None, slots: int = 2,
                      trace: bool = False) -> BlockSwap:
    """Keep `resident_blocks` (the first K, or these indices) on the device and stream the others.

    source="host": streamed blocks move to pinned host memory (from wherever they are; a meta-device
    block gets empty memory, filled later by build_model's loading). source="file": they are read
    from `files` (the checkpoint the model was built from) at each use and kept nowhere.
    Quantize (quantize_fp8) before this; LoRA fusion (lora_applied) works after it."""
    if isinstance(getattr(model, "residency", None), BlockSwap):
        raise ValueError("block swap is already enabled on this model: disable_block_swap(model) first")
    swap = BlockSwap(model, resident_blocks, source, files, device, slots, trace)
    model.residency = swap
    return swap


def disable_block_swap(model: nn.Module) -> None:
    """All blocks resident on the device again."""
    swap = getattr(model, "residency", None)
    if isinstance(swap, BlockSwap):
        swap.close()
        model.residency = ALL_RESIDENT


def build_swapped_model(cfg, ctx=SINGLE, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                        files: list[str] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                        plan_rule=None, seed: int | None = None, resident_blocks: int | Iterable[int] = 0,
                        source: str = "host", slots: int = 2, fp8: bool = False) -> nn.Module:
    """build_model whose streamed blocks never exist on the device: they are materialised straight
    into pinned host memory (random weights are drawn on `device` one tensor at a time and copied
    there, so a seed gives the resident model's weights), or left in the checkpoint (source="file").
    fp8: the blocks are built in ordinary host memory, quantized there (quantize_fp8, on the CPU),
    then attached; the fp8 tensors are what streams."""
    if source == "file" and files is None:
        raise ValueError("source='file' needs files=[the safetensors checkpoint]")
    if fp8:
        if source != "host":
            raise ValueError("fp8=True needs source='host': the checkpoint holds no fp8 tensors to stream")
        model = build_model(cfg, ctx, device, dtype, files=files, state_dict=state_dict, plan_rule=plan_rule, seed=seed,
                            place_blocks=_blocks_on_host)
        quantize_fp8(model)
        enable_block_swap(model, resident_blocks, "host", device=device, slots=slots)
        return model

    def place(model: nn.Module, dev: torch.device) -> Collection[str]:
        return enable_block_swap(model, resident_blocks, source, files, dev, slots).file_keys

    return build_model(cfg, ctx, device, dtype, files=files, state_dict=state_dict, plan_rule=plan_rule, seed=seed,
                       place_blocks=place)


def _blocks_on_host(model: nn.Module, device: torch.device) -> Collection[str]:
    model.transformer_blocks.to_empty(device="cpu")
    return ()


def spread_blocks(k: int, num_blocks: int) -> list[int]:
    """k block indices spread evenly from block 0 on. Resident blocks between streamed ones lengthen
    the time a copy has (a streamed block's copy may start when the block two streamed blocks before
    it ends), which matters where one copy takes longer than one block's compute."""
    if not 0 <= k <= num_blocks:
        raise ValueError(f"resident_blocks must be in [0, {num_blocks}] (the model's blocks), got {k}")
    return sorted({i * num_blocks // k for i in range(k)}) if k else []
