"""LoRA deltas fused into the DiT for a while (the distilled LoRA of the official stage 2).

The official two-stage pipeline denoises stage 2 with the base weights plus the distilled LoRA
(ltx-pipelines builds a second, fused transformer). Here the one resident model takes the delta in
place for stage 2 and gets its exact original weights back afterwards (a copy of the touched
tensors is kept on the CPU meanwhile), so no second 35 GiB model is ever built.

Fusion matches ltx-core's `fuse_loras`: delta = (B * strength) @ A in the LoRA's dtype, cast to
the weight's dtype, then added to the weight. Under TP each rank adds only its shard: the delta
goes through the parameter's own weight loader (the same one the checkpoint used). A block
streamed by block swap (memory/swap.py) keeps its home copy untouched: the delta is added to the
device copy each time the block is streamed in (same arithmetic, so the same bits as resident).
The layer's weight method does the addition: fp8 storage (fp8-cast) rounds the sum back to e4m3
as ltx-core does; fp8 matmul formats refuse.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from ltx2_tp.layers.quantization.base import UNQUANTIZED
from ltx2_tp.memory.residency import ALL_RESIDENT
from ltx2_tp.models.ltx2.weights import COMFY_PREFIX, checkpoint_spec

LORA_PREFIXES = ("diffusion_model.", COMFY_PREFIX)


@dataclass
class LoraWeights:
    """A LoRA file: target weight key (official, unprefixed) -> (A, B), and its strength."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    strength: float = 1.0

    @classmethod
    def from_file(cls, path: str, strength: float = 1.0) -> "LoraWeights":
        from safetensors.torch import load_file

        sd = load_file(path)
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k in sd:
            if not k.endswith(".lora_A.weight"):
                continue
            base = k[: -len(".lora_A.weight")]
            b = sd.get(base + ".lora_B.weight")
            if b is None:
                raise ValueError(f"LoRA {path}: {k} has no matching lora_B")
            for p in LORA_PREFIXES:
                if base.startswith(p):
                    base = base[len(p):]
                    break
            pairs[base + ".weight"] = (sd[k], b)
        if not pairs:
            raise ValueError(f"LoRA {path}: no lora_A / lora_B tensors found")
        return cls(pairs, strength)


@contextmanager
@torch.no_grad()
def lora_applied(model: torch.nn.Module, lora: LoraWeights | None):
    """Weights + LoRA inside the block, the exact original weights after it."""
    if lora is None:
        yield
        return
    spec = checkpoint_spec(model)
    unknown = sorted(set(lora.pairs) - set(spec))
    if unknown:
        raise ValueError(f"LoRA targets weights the model does not have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for key in lora.pairs:  # the layer's weight method says whether its weight takes a delta
        method = getattr(spec[key].owner, "quant_method", None)
        if method is not None and not method.supports_lora:
            raise ValueError(f"the distilled LoRA cannot be fused into {key}, stored by {type(method).__name__}: "
                             f"{method.lora_hint or 'fuse it before quantize_fp8'}")
    residency = getattr(model, "residency", ALL_RESIDENT)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for key, (a, b) in lora.pairs.items():
            param = spec[key].param
            fuse = partial(_fuse, spec[key], lora.strength)
            if residency.add_delta(param, fuse, (a, b)):  # a streamed block: fused into each copy it gets
                continue
            if id(param) not in saved:
                saved[id(param)] = (param, param.detach().to("cpu", copy=True))
            fuse(param, a.to(param.device), b.to(param.device))
        yield
    finally:
        residency.clear_deltas()
        for param, original in saved.values():
            param.copy_(original.to(param.device))


def _fuse(entry, strength: float, target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """target += this rank's part of (B * strength) @ A, computed in the LoRA's dtype on a's device;
    the layer's weight method does the addition (fp8 storage rounds back to e4m3)."""
    def local(full: torch.Tensor) -> torch.Tensor:  # the loader writes this rank's part at its place
        part = torch.zeros(target.shape, dtype=full.dtype, device=full.device)
        entry.loader(part, full, entry.shard) if entry.shard is not None else entry.loader(part, full)
        return part

    method = getattr(entry.owner, "quant_method", None) or UNQUANTIZED
    method.add_lora_(entry.owner, target, torch.matmul(b * strength, a), local)
