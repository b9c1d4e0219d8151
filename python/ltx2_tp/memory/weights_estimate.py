"""Weight bytes per transformer block for each storage, before anything is allocated (the planner's figures).

A block is built on the meta device, converted to the storage's layout (shapes only: the same code
that converts real layers, models/ltx2/quantization.py), and measured as block swap lays it out:
every parameter and buffer at a 512-byte offset (memory/swap.py block_nbytes), i.e. what one
streamed block occupies in a slot and what a resident block holds on the device (the alignment adds
under 0.01%). Under TP, one rank's shards.

19B (ltx-2-19b), one rank, MiB a block (GiB for 48): bf16 736.4 (34.52); fp8-rowwise 368.8 (17.29);
fp8-cast 368.4 (17.27); fp8-scaled-mm 368.4 (19.42: blocks 0 and 43-47 stay bf16, as in ltx-core's
files). TP=2 halves each (bf16 368.3). Transients beside them: fp8-cast upcasts one weight while its
linear runs (largest: an FFN weight, 128 MiB in bf16, and 256 MiB more in fp32 on the way when the
file is per-tensor scaled); the fp8 matmuls hold x * (1 / scale) in x's dtype and its e4m3 copy.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.memory.swap import block_nbytes
from ltx2_tp.models.ltx2.block import AVTransformerBlock
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.quantization import QUANTIZATIONS, SCALED_EXCLUDED_BLOCKS, quantize_model

STORAGES = ("bf16", *QUANTIZATIONS)


@lru_cache(maxsize=64)
def _block_bytes(cfg: LTX2Config, storage: str, tp_size: int, index: int) -> int:
    """One block at position `index` (the layer rules look at it), converted on the meta device."""
    with torch.device("meta"):
        block = AVTransformerBlock(index, cfg, ParallelContext(tp_size=tp_size)).to(torch.bfloat16)
    if storage != "bf16":
        holder = torch.nn.Module()
        holder.transformer_blocks = torch.nn.ModuleDict({str(index): block})  # names transformer_blocks.<index>.*
        quantize_model(holder, storage)
    return block_nbytes(block)


def block_weight_bytes(cfg: LTX2Config, storage: str = "bf16", block: int = 1, tp_size: int = 1) -> int:
    """Bytes of block `block`'s weights on one rank, stored as `storage` (bf16 or a --quantization value)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    cfg.validate_parallel(tp_size, 1)
    if storage == "fp8-scaled-mm" and block in SCALED_EXCLUDED_BLOCKS:
        storage = "bf16"
    return _block_bytes(cfg, storage, tp_size, 1 if storage == "fp8-scaled-mm" else 0)


def model_block_bytes(cfg: LTX2Config, storage: str = "bf16", tp_size: int = 1) -> list[int]:
    """block_weight_bytes of every block, in order."""
    return [block_weight_bytes(cfg, storage, i, tp_size) for i in range(cfg.num_layers)]


@lru_cache(maxsize=16)
def non_block_weight_bytes(cfg: LTX2Config, tp_size: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of the weights outside the transformer blocks on one rank (patchify projections, caption
    projections, AdaLN, scale-shift tables, proj_out): always resident, in the model's dtype (fp8
    converts block linears only). 19B bf16: 0.64 GiB on every rank (TP leaves them whole)."""
    from ltx2_tp.models.ltx2.model import LTX2Model

    cfg.validate_parallel(tp_size, 1)
    with torch.device("meta"):
        model = LTX2Model(dataclasses.replace(cfg, num_layers=0), ParallelContext(tp_size=tp_size))
    return sum(t.numel() * dtype_bytes for t in [*model.parameters(), *model.buffers()])
