"""fp8 in the DiT: which block linears, in which format, and how a model gets there.

`--quantization` is ltx-pipelines' flag (its values fp8-cast and fp8-scaled-mm, plus our fp8-rowwise;
`--fp8` stays as fp8-rowwise). An fp8 checkpoint is recognised from its tensors (e4m3 block
weights; `weight_scale` beside them: per-tensor scaled) and loaded as stored, with no flag:

| checkpoint \\ flag     | (none)              | fp8-cast                       | fp8-scaled-mm                | fp8-rowwise  |
|-----------------------|---------------------|--------------------------------|------------------------------|--------------|
| bf16                  | bf16                | cast on load (ltx-core's)      | quantized on load, dynamic x | quantize_fp8 |
| fp8, per-tensor scaled| fp8-scaled-mm       | stored fp8, bf16 compute       | = (none)                     | refused      |
| fp8, no scales (cast) | fp8-cast            | = (none)                       | refused                      | refused      |

Layers: a pre-quantized checkpoint decides by itself (its e4m3 weights; the rest stay bf16, as
ltx-core main discovers them). On load: fp8-cast takes ltx-core's fp8_cast list (to_q/k/v, to_out.0,
ff.net.0.proj, ff.net.2 of every block); fp8-scaled-mm every block linear but blocks 0 and 43-47
(ltx-core 1.0.0's EXCLUDED_LAYER_SUBSTRINGS, the official files' choice); fp8-rowwise every block
linear (quantize_fp8). _scaled_mm needs both dims of a weight to be multiples of 16: others stay bf16.

Converting on load never holds the whole bf16 model on the device: blocks are loaded in host
memory and moved and converted one at a time (device peak: the fp8 model + one bf16 block).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.layers.fp8 import FP8_ROWWISE
from ltx2_tp.layers.linear import LinearBase
from ltx2_tp.layers.quantization.base import UNQUANTIZED, LinearMethodBase
from ltx2_tp.layers.quantization.fp8_cast import FP8_CAST, FP8_CAST_SCALED, FP8_CAST_WEIGHT_SCALED
from ltx2_tp.layers.quantization.fp8_per_tensor import FP8_SCALED_MM, FP8_SCALED_MM_DYNAMIC, tp_amax
from ltx2_tp.memory.plan import PlanRule
from ltx2_tp.memory.swap import build_swapped_model, enable_block_swap
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.model import LTX2Model
from ltx2_tp.models.ltx2.weights import _Source, build_model

FLAG = "--quantization"
QUANTIZATIONS = ("fp8-cast", "fp8-scaled-mm", "fp8-rowwise")
FP8_MATMUL = ("fp8-scaled-mm", "fp8-rowwise")  # run torch._scaled_mm: a CUDA GPU with CC >= 8.9
CAST_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", "ff.net.0.proj.weight",
                 "ff.net.2.weight")  # ltx-core 1.0.0 TRANSFORMER_LINEAR_DOWNCAST_MAP
SCALED_EXCLUDED_BLOCKS = frozenset({0, 43, 44, 45, 46, 47})  # ltx-core 1.0.0 fp8_scaled_mm.EXCLUDED_LAYER_SUBSTRINGS
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class CheckpointFormat:
    kind: str | None = None  # None (no fp8 block weights), "fp8-scaled-mm" or "fp8-cast"
    fp8_weights: int = 0
    static_input_scales: bool = False

    def describe(self) -> str:
        if self.kind is None:
            return "bf16 (no fp8 block weights)"
        if self.kind == "fp8-cast":
            return f"fp8 without scales (ltx-core's fp8_cast format, {self.fp8_weights} e4m3 weights)"
        return (f"fp8 with per-tensor scales (ltx-core's fp8_scaled_mm format, {self.fp8_weights} e4m3 weights, "
                f"{'static input scales' if self.static_input_scales else 'no input scales'})")


BF16_FORMAT = CheckpointFormat()


def inspect_checkpoint(files: list[str] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                       src: _Source | None = None) -> CheckpointFormat:
    """The format of a checkpoint's block weights, from the file headers (no tensor is read)."""
    src = src or _Source(state_dict, files)
    keys = set(src.keys())
    weights = [k for k in keys if k.startswith("transformer_blocks.") and k.endswith(".weight")]
    e5m2 = [k for k in weights if src.dtype(k) == torch.float8_e5m2]
    if e5m2:
        raise ValueError(f"checkpoint: e5m2 weights ({e5m2[0]}, ...) are not an LTX-2 format (ltx-core writes e4m3)")
    fp8 = [k for k in weights if src.dtype(k) == torch.float8_e4m3fn]
    if not fp8:
        return BF16_FORMAT
    scaled = [k for k in fp8 if k[:-len("weight")] + "weight_scale" in keys]
    if scaled and len(scaled) != len(fp8):
        bare = sorted(set(fp8) - set(scaled))
        raise ValueError(f"checkpoint: {len(scaled)} e4m3 weights have a weight_scale and {len(bare)} do not "
                         f"({bare[0]}, ...): not one fp8 format")
    static = [k for k in scaled if k[:-len("weight")] + "input_scale" in keys]
    if static and len(static) != len(scaled):
        raise ValueError(f"checkpoint: {len(static)} of {len(scaled)} scaled e4m3 weights have an input_scale")
    return CheckpointFormat("fp8-scaled-mm" if scaled else "fp8-cast", len(fp8), bool(static))


def resolve(requested: str | None, fmt: CheckpointFormat = BF16_FORMAT) -> str | None:
    """The quantization a model gets: `requested` (the --quantization value, None if not given) on a
    checkpoint of format `fmt`. A refusal names the flag and what the checkpoint allows."""
    if requested is not None and requested not in QUANTIZATIONS:
        raise ValueError(f"{FLAG}: unknown value {requested!r}; allowed: {', '.join(QUANTIZATIONS)}")
    if fmt.kind is None or requested in (None, fmt.kind):
        return requested if fmt.kind is None else fmt.kind
    if fmt.kind == "fp8-scaled-mm" and requested == "fp8-cast":
        return "fp8-cast"
    allowed = ("fp8-scaled-mm", "fp8-cast") if fmt.kind == "fp8-scaled-mm" else ("fp8-cast",)
    raise ValueError(f"{FLAG} {requested}: the checkpoint is already {fmt.describe()}; with it {FLAG} may be "
                     f"{' or '.join(allowed)} (or left out)")


# ---- layers ------------------------------------------------------------------------------------------
def block_linears(model: nn.Module) -> list[tuple[str, LinearBase]]:
    """(official module name, layer) of every parallel linear inside the transformer blocks."""
    return [(f"transformer_blocks.{name}", m) for name, m in model.transformer_blocks.named_modules()
            if isinstance(m, LinearBase)]


def weight_keys(name: str, layer: LinearBase) -> list[str]:
    """The checkpoint weights a layer loads (to_q, to_k, to_v for a fused q/k/v)."""
    return [k for k in layer.checkpoint_spec(name) if k.endswith(".weight")]


def _convertible(layer: LinearBase) -> bool:
    rows, k = layer.weight.shape
    return rows % 16 == 0 and k % 16 == 0  # _scaled_mm's shape rule


def on_load_targets(model: nn.Module, quantization: str) -> list[tuple[str, LinearBase]]:
    """The block linears `quantization` converts in a bf16 model (see the module docstring)."""
    out = []
    for name, layer in block_linears(model):
        if quantization == "fp8-cast":
            ok = all(k.endswith(CAST_SUFFIXES) for k in weight_keys(name, layer))
        elif quantization == "fp8-scaled-mm":
            ok = int(name.split(".")[1]) not in SCALED_EXCLUDED_BLOCKS and _convertible(layer)
        elif quantization == "fp8-rowwise":
            ok = _convertible(layer)
        else:
            raise ValueError(f"{FLAG}: unknown value {quantization!r}; allowed: {', '.join(QUANTIZATIONS)}")
        if ok and layer.quant_method is UNQUANTIZED:  # not converted yet
            out.append((name, layer))
    return out


def _prepare(layer: LinearBase, method: LinearMethodBase) -> None:
    """Give `layer` `method`'s empty tensors (meta device: shapes only), replacing its bf16 weight."""
    rows, k = layer.weight.shape
    with torch.device(layer.weight.device):
        method.create_weights(layer, k, rows)
    layer.quant_method = method


@torch.no_grad()
def convert(layer: LinearBase, quantization: str, input_amax: torch.Tensor | None = None) -> None:
    """One loaded bf16 layer -> `quantization`'s storage (a meta layer: shapes only)."""
    if layer.weight.is_meta:
        method = {"fp8-cast": FP8_CAST, "fp8-rowwise": FP8_ROWWISE,
                  "fp8-scaled-mm": FP8_SCALED_MM if input_amax is not None else FP8_SCALED_MM_DYNAMIC}[quantization]
        return _prepare(layer, method)
    if quantization == "fp8-cast":
        FP8_CAST.cast(layer)
    elif quantization == "fp8-rowwise":
        FP8_ROWWISE.quantize(layer)
    elif input_amax is not None:
        FP8_SCALED_MM.quantize(layer, tp_amax(input_amax.to(layer.weight.device), layer))
    else:
        FP8_SCALED_MM_DYNAMIC.quantize(layer)


def quantize_model(model: nn.Module, quantization: str, input_amax: dict[str, torch.Tensor] | None = None) -> int:
    """Convert a built bf16 model's block linears in place (where they are); returns how many.
    `input_amax` (layer name -> calibrated amax of its input, calibrate_input_amax): fp8-scaled-mm
    with static input scales, as an official checkpoint; without it the activation scale is dynamic."""
    targets = on_load_targets(model, quantization)
    for name, layer in targets:
        convert(layer, quantization, None if input_amax is None else input_amax[name])
    return len(targets)


def assign_checkpoint_methods(model: nn.Module, src: _Source, quantization: str | None) -> int:
    """Before materialising: give each block linear whose checkpoint weights are e4m3 the method that
    loads them as stored (`quantization`: the resolved value, fp8-cast or the checkpoint's own)."""
    n = 0
    for name, layer in block_linears(model):
        keys = weight_keys(name, layer)
        fp8 = [k for k in keys if src.dtype(k) in FP8_DTYPES] if all(k in src.keys() for k in keys) else []
        if not fp8:
            continue
        if len(fp8) != len(keys):
            raise ValueError(f"checkpoint: {name} fuses {keys}, of which only {fp8} are e4m3: the fused shards must "
                             "share one storage")
        stem = keys[0][:-len("weight")]
        scaled, static = stem + "weight_scale" in src.keys(), stem + "input_scale" in src.keys()
        if not scaled:
            method = FP8_CAST
        elif quantization == "fp8-cast":
            method = FP8_CAST_SCALED if static else FP8_CAST_WEIGHT_SCALED
        else:
            method = FP8_SCALED_MM if static else FP8_SCALED_MM_DYNAMIC
        _prepare(layer, method)
        n += 1
    return n


# the storage (memory/weights_estimate.py STORAGES, --quantization's names) each fp8 method holds
STORAGE_OF_METHOD = ((FP8_CAST, "fp8-cast"), (FP8_CAST_SCALED, "fp8-cast"), (FP8_CAST_WEIGHT_SCALED, "fp8-cast"),
                     (FP8_SCALED_MM, "fp8-scaled-mm"), (FP8_SCALED_MM_DYNAMIC, "fp8-scaled-mm"),
                     (FP8_ROWWISE, "fp8-rowwise"))


def storage(model: nn.Module) -> str:
    """The blocks' storage as the planner names it: the fp8 format of the block linears (fp8-scaled-mm
    keeps some bf16, as its files do), bf16 when none is fp8. One model holds one fp8 format."""
    for _, layer in block_linears(model):
        for method, name in STORAGE_OF_METHOD:
            if layer.quant_method is method:
                return name
    return "bf16"


def describe(model: nn.Module) -> str:
    """'<count> <method> ...' of the block linears, e.g. for the CLI's log line."""
    counts: dict[str, int] = {}
    for _, layer in block_linears(model):
        m = layer.quant_method
        label = {FP8_SCALED_MM: "fp8-scaled-mm (static input scales)", FP8_SCALED_MM_DYNAMIC:
                 "fp8-scaled-mm (dynamic input scales)", FP8_CAST: "fp8-cast", FP8_CAST_SCALED: "fp8-cast (scaled)",
                 FP8_CAST_WEIGHT_SCALED: "fp8-cast (scaled)",
                 FP8_ROWWISE: "fp8-rowwise"}.get(m, "bf16" if m.supports_lora else type(m).__name__)
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) + " block linears"


# ---- calibration (static input scales for quantize-on-load) --------------------------------------------
@torch.no_grad()
def calibrate_input_amax(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """amax of every block linear's input over `run()` (forwards of the bf16 model): with it,
    quantize_model(..., "fp8-scaled-mm", input_amax=...) gives static scales (amax / 448), as the
    official checkpoints' calibration does. Fused shards see one input, so they share one."""
    amax: dict[str, torch.Tensor] = {}
    layers = block_linears(model)
    for name, layer in layers:
        def watch(x, bias=None, out_rows=None, _name=name, _layer=layer):
            a = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
            amax[_name] = torch.maximum(amax[_name], a) if _name in amax else a
            return LinearBase.matmul(_layer, x, bias, out_rows)
        layer.matmul = watch
    try:
        run()
    finally:
        for _, layer in layers:
            del layer.matmul
    return amax


# ---- building -----------------------------------------------------------------------------------------
def build_transformer(cfg: LTX2Config, ctx: ParallelContext = SINGLE, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.bfloat16, files: list[str] | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None, seed: int | None = None,
                      plan_rule: PlanRule | None = None, quantization: str | None = None,
                      input_amax: dict[str, torch.Tensor] | None = None,
                      resident_blocks: int | Iterable[int] | None = None, source: str = "host",
                      slots: int = 2) -> LTX2Model:
    """build_model (or, with `resident_blocks`, block swap's build_swapped_model) in the fp8 format the
    checkpoint holds or `quantization` asks for (module docstring). An fp8 checkpoint's tensors load as
    stored (and stream from the file with source="file"); a conversion on load happens per block."""
    device = torch.device(device)
    src = _Source(state_dict, files) if files is not None or state_dict is not None else None
    fmt = inspect_checkpoint(src=src) if src is not None else BF16_FORMAT
    method = resolve(quantization, fmt)
    swap = resident_blocks is not None
    if fmt.kind is not None:  # pre-quantized: the methods are chosen on the meta model, then its tensors load

        def place(model: LTX2Model, dev: torch.device) -> Collection[str]:
            assign_checkpoint_methods(model, src, method)
            if swap:
                return enable_block_swap(model, resident_blocks, source, files, dev, slots).file_keys
            model.transformer_blocks.to_empty(device=dev)
            return ()

        return build_model(cfg, ctx, device, dtype, files=files, state_dict=state_dict, plan_rule=plan_rule,
                           seed=seed, place_blocks=place)
    if method is None:
        if swap:
            return build_swapped_model(cfg, ctx, device, dtype, files=files, state_dict=state_dict, plan_rule=plan_rule,
                                       seed=seed, resident_blocks=resident_blocks, source=source, slots=slots)
        return build_model(cfg, ctx, device, dtype, files=files, state_dict=state_dict, plan_rule=plan_rule, seed=seed)
    if swap and source != "host":
        raise ValueError(f"{FLAG} {method} converts a bf16 checkpoint in memory, so its streamed blocks come from "
                         "host memory: source='host' (source='file' streams an fp8 checkpoint's own tensors)")
    model = build_model(cfg, ctx, device, dtype, files=files, state_dict=state_dict, plan_rule=plan_rule, seed=seed,
                        place_blocks=_blocks_on_host)
    targets = on_load_targets(model, method)
    for i, block in enumerate(model.transformer_blocks):
        if not swap:
            block.to(device)  # one bf16 block on the device at a time
        for name, layer in targets:
            if name.startswith(f"transformer_blocks.{i}."):
                convert(layer, method, None if input_amax is None else input_amax[name])
    if swap:
        enable_block_swap(model, resident_blocks, "host", device=device, slots=slots)
    return model


def _blocks_on_host(model: nn.Module, device: torch.device) -> Collection[str]:
    model.transformer_blocks.to_empty(device="cpu")
    return ()
