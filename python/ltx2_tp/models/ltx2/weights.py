"""Loading official LTX-2 checkpoints into LTX2Model (any TP rank).

- Keys are the official ones (../shared/ltx2.md), with or without the ComfyUI prefix
  `model.diffusion_model.`; fused q/k/v (and k/v) parameters take their checkpoint tensors as
  shards, so the checkpoint never needs rewriting.
- Every mismatch (missing, unexpected, wrong shape) is found from the file header before any
  tensor is read, and reported in one CheckpointMismatchError.
- The model is built on the meta device, materialised empty on the target device, then filled
  tensor by tensor from safetensors: no full-size random model is ever initialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch
from torch import nn

from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.weight_loading import CheckpointEntry, default_weight_loader
from ltx2_tp.memory.plan import PlanRule
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.model import LTX2Model

COMFY_PREFIX = "model.diffusion_model."
# Tensors stored under the transformer prefix that belong to other components (text connectors).
FOREIGN_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.", "text_embedding_projection.")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointMismatchError(ValueError):
    pass


def checkpoint_spec(model: nn.Module) -> dict[str, CheckpointEntry]:
    """checkpoint key -> CheckpointEntry (tensor to fill, loader, shard id or None, full shape).

    Sharded layers describe their own entries (`checkpoint_spec(name)`: the parallel linears, whose
    quantization method names the tensors, and the sharded qk norm); every other parameter loads
    whole. Entries are built on demand from the modules (a parameter object is replaced by
    `to_empty`, so nothing is stored on it).
    """
    spec: dict[str, CheckpointEntry] = {}
    for name, mod in model.named_modules():
        own = getattr(mod, "checkpoint_spec", None)
        if own is not None:
            spec.update(own(name))
            continue
        prefix = f"{name}." if name else ""
        for pname, p in mod.named_parameters(recurse=False):
            spec[prefix + pname] = CheckpointEntry(p, default_weight_loader, None, tuple(p.shape), mod)
    return spec


class _Source:
    """Tensors by checkpoint key, from safetensors files (lazy) or an in-memory state dict."""

    def __init__(self, state_dict: dict[str, torch.Tensor] | None = None, files: list[str] | None = None):
        self._sd, self._where, self._handles = state_dict, {}, []
        self.metadata: dict[str, str] = {}
        if files is not None:
            from safetensors import safe_open

            for f in files:
                h = safe_open(f, framework="pt")
                self._handles.append(h)
                self.metadata.update(h.metadata() or {})
                for k in h.keys():
                    self._where[k] = h
        raw = list(state_dict) if state_dict is not None else list(self._where)
        prefixed = [k for k in raw if k.startswith(COMFY_PREFIX)]
        self._map = {k[len(COMFY_PREFIX):]: k for k in prefixed} if prefixed else {k: k for k in raw}

    def keys(self) -> Iterable[str]:
        return self._map.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        raw = self._map[key]
        if self._sd is not None:
            return tuple(self._sd[raw].shape)
        return tuple(self._where[raw].get_slice(raw).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        raw = self._map[key]
        if self._sd is not None:
            return self._sd[raw].dtype
        return SAFETENSORS_DTYPES.get(self._where[raw].get_slice(raw).get_dtype(), torch.uint8)

    def get(self, key: str) -> torch.Tensor:
        raw = self._map[key]
        return self._sd[raw] if self._sd is not None else self._where[raw].get_tensor(raw)


def _check(spec, src: _Source) -> None:
    keys = set(src.keys())
    missing = sorted(set(spec) - keys)
    unexpected = sorted(k for k in keys - set(spec) if not k.startswith(FOREIGN_PREFIXES))
    wrong = [f"{k}: checkpoint {src.shape(k)} vs model {spec[k][3]}" for k in sorted(keys & set(spec))
             if src.shape(k) != spec[k][3]]
    if missing or unexpected or wrong:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"{title} ({len(items)}):\n  " + "\n  ".join(items))
        raise CheckpointMismatchError("checkpoint does not match the model config:\n" + "\n".join(lines))


def load_weights(model: LTX2Model, state_dict: dict[str, torch.Tensor] | None = None,
                 files: list[str] | None = None, skip: Collection[str] = ()) -> None:
    """Fill `model` (already materialised) from a state dict or safetensors files; the keys in
    `skip` are checked but not read (block swap reads them from the file at each use)."""
    src = _Source(state_dict, files)
    spec = checkpoint_spec(model)
    _check(spec, src)
    for key, entry in spec.items():
        if key not in skip:
            _load_one(entry, src.get(key))


@torch.no_grad()
def _load_one(entry: CheckpointEntry, t: torch.Tensor) -> None:
    t = t.to(device=entry.param.device, dtype=entry.param.dtype)
    if entry.shard is not None:
        entry.loader(entry.param, t, entry.shard)
    else:
        entry.loader(entry.param, t)


def read_checkpoint_config(files: list[str]) -> dict | None:
    """The `config` JSON official checkpoints carry in their safetensors metadata, if any."""
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt") as h:
            meta = h.metadata() or {}
        if "config" in meta:
            return json.loads(meta["config"])
    return None


def build_model(cfg: LTX2Config, ctx: ParallelContext = SINGLE, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16, files: list[str] | None = None,
                state_dict: dict[str, torch.Tensor] | None = None, plan_rule: PlanRule | None = None,
                seed: int | None = None,
                place_blocks: Callable[[LTX2Model, torch.device], Collection[str]] | None = None) -> LTX2Model:
    """Meta-device construction, then materialise: from a checkpoint, or seeded random weights.

    `place_blocks(model, device)` materialises the transformer blocks itself (memory/swap.py:
    streamed blocks straight into pinned host memory) and returns the checkpoint keys it reads
    at run time instead of now."""
    with torch.device("meta"):
        model = LTX2Model(cfg, ctx, plan_rule)
    model = model.to(dtype=dtype)
    device = torch.device(device)
    lazy: Collection[str] = ()
    if place_blocks is None:
        model.to_empty(device=device)
    else:
        model.to_empty(device=device, recurse=False)
        for name, child in model.named_children():
            if name != "transformer_blocks":
                child.to_empty(device=device)
        lazy = place_blocks(model, device)
    model.eval()
    if files is not None or state_dict is not None:
        load_weights(model, state_dict=state_dict, files=files, skip=lazy)
    else:
        init_random(model, seed if seed is not None else 0, device=device)
    return model


def init_random(model: LTX2Model, seed: int, std: float = 0.02, device: torch.device | None = None) -> None:
    """Seeded random weights, identical on every TP rank: each checkpoint tensor is drawn at full
    size on `device` (default: the model's; one tensor at a time) and passed through the same loaders
    as a checkpoint, so a tensor kept elsewhere (a streamed block in host memory) gets the same values.
    The values depend on the device type (CPU and CUDA generators differ)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    spec = checkpoint_spec(model)
    for key, entry in spec.items():
        full = entry.shape
        if "scale_shift_table" in key:
            t = torch.randn(full, generator=g, device=device) / full[-1] ** 0.5
        elif key.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(full, generator=g, device=device)
        else:
            t = torch.randn(full, generator=g, device=device) * std
        _load_one(entry, t)


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path, config: dict | None = None,
                    prefix: str = "") -> None:
    """Write tensors in the official layout (used by tests and the tiny model)."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(config)} if config is not None else None
    save_file({prefix + k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=meta)


def official_state_dict(model: LTX2Model) -> dict[str, torch.Tensor]:
    """Our weights under the official keys, fused q/k/v split back apart (single-rank models)."""
    if model.ctx.tp_size != 1:
        raise ValueError("official_state_dict needs an unsharded model (tp_size=1)")
    out = {}
    for key, e in checkpoint_spec(model).items():
        t = e.param.detach()
        if e.shape == () and t.ndim == 1:  # a per-shard scalar (fp8 scale): one slot per fused shard
            out[key] = t[e.shard or 0].clone()
            continue
        out[key] = (t.narrow(0, e.shard * e.shape[0], e.shape[0]) if e.shard is not None else t).clone()
    return out
