"""fp8 (e4m3) linears with one scale per weight tensor: ltx-core's `fp8_scaled_mm` format.

Lightricks' fp8 checkpoints (ltx-2-19b-dev-fp8, ltx-2.3-22b-*-fp8) hold, for each quantized linear L:
`L.weight` e4m3 (out, in) - the usual layout; ltx-core 1.0.0 transposes it to (in, out) on load for
its cuBLAS op -, `L.weight_scale` fp32 () and `L.input_scale` fp32 () (a static activation scale
from calibration). Per call: x8 = e4m3(clamp(x / input_scale)), y = x8 @ weight^T * input_scale *
weight_scale (+ bias), one `torch._scaled_mm` (H100: 1.29-1.44 PFLOP/s with per-tensor scales vs
1.11-1.17 per row, shared/anchors.md). Which linears are fp8 is read from the checkpoint
(models/ltx2/quantization.py).

Fused layers (q/k/v; cross-attention k/v) load each checkpoint weight as a shard with its own
scales, so `weight_scale` and `input_scale` hold one scalar per shard (LinearBase.scalar_loader).
`_scaled_mm` takes a per-tensor scale pair or per-row vectors, never a mix, so a call that spans
shards with different weight scales runs one row-wise GEMM with the per-shard scalars expanded to
a per-row vector - the same products as ltx-core's three per-tensor GEMMs, at the row-wise rate
(anchors.md: -14% on 32640x4096x4096) but without three outputs to concatenate (a 0.8 GB copy at
1080p x 121); a call inside one shard (STG's value projection) or an unfused layer stays
per-tensor. The activation is quantized once per call with the largest input scale of the shards
it spans: ltx-core's own when they are equal (calibrated on the same input, they are).

Two instances: FP8_SCALED_MM (static input scales, an official checkpoint) and
FP8_SCALED_MM_DYNAMIC (`quantize` of a bf16 layer on load: weight scales from its amax, as
ltx-core's quantize_weight_to_fp8_per_tensor; no calibration, so the activation scale is the
amax of each call's x / 448 - not the official static scales; under TP a row-parallel shard takes
its own, and a batched CFG/STG pass shares one across its samples).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ltx2_tp.layers.linear import LinearBase
from ltx2_tp.layers.quantization.base import LinearMethodBase, OutRows, narrow_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# ltx-core's FP8Linear passes use_fast_accum=True (Hopper: accumulation promoted every few k-steps)
FAST_ACCUM = True


# ---- shards of a fused layer --------------------------------------------------------------------
def shard_sizes(layer: nn.Module, out_rows: int) -> list[int]:
    """Output rows of each checkpoint weight this rank's layer holds (one entry for an unfused layer)."""
    return list(getattr(layer, "local_sizes", None) or [out_rows])


def _spans(sizes: list[int], out_rows: OutRows | None) -> list[tuple[int, int]]:
    """(shard, rows of it inside `out_rows`) for every shard the row range touches."""
    start, length = out_rows if out_rows is not None else (0, sum(sizes))
    spans, off = [], 0
    for i, n in enumerate(sizes):
        lo, hi = max(start, off), min(start + length, off + n)
        if hi > lo:
            spans.append((i, hi - lo))
        off += n
    return spans


def row_scales(scales: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Per-shard scalars (shards,) -> one per output row (rows,), fp32."""
    return torch.cat([scales[i:i + 1].expand(n) for i, n in spans])


# ---- arithmetic ------------------------------------------------------------------------------------
def quantize_per_tensor(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (e4m3 values, fp32 weight_scale ()) with ltx-core's arithmetic (quantize_weight_to_fp8_per_tensor:
    scale = 448 / amax, q = e4m3(clamp(w * scale)), weight_scale = 1 / scale), so a bf16 checkpoint
    quantized here gives the bytes of one quantized by ltx-core. `amax`: of the whole tensor (TP shards)."""
    w32 = w.float()
    amax = w32.abs().amax() if amax is None else amax.float()
    scale = FP8_MAX / amax.clamp_min(1e-12)  # an all-zero tensor: ltx-core would divide by 0
    return (w32 * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reciprocal()


def quantize_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> e4m3(clamp(x / scale)) as ltx-core's FP8Linear (clamped first: an unclamped cast
    overflows to NaN on CUDA; x * (1 / scale) in x's dtype)."""
    return (x * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def tp_amax(amax: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The max over the TP ranks of a per-shard amax (each rank holds part of the checkpoint tensor)."""
    ctx = getattr(layer, "ctx", None)
    if ctx is None or ctx.tp_size == 1:
        return amax
    t = amax.float()
    if dist.get_backend(ctx.tp_group) == "nccl" and not t.is_cuda:  # blocks converted in host memory
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.tp_group)
    return t.to(amax.device)


class Fp8PerTensorLinearMethod(LinearMethodBase):
    """`weight` e4m3 (out, k); `weight_scale` (shards,) fp32; with static input scales `input_scale`
    (shards,) fp32. All three are the checkpoint's tensors (block swap streams them from the file)."""

    supports_lora = False
    lora_hint = ("ltx2_tp fuses a LoRA into bf16 or fp8-cast weights only: run with --quantization fp8-cast "
                 "(fp8 storage, bf16 compute) to use the distilled LoRA")

    def __init__(self, static_input_scale: bool):
        self.static = static_input_scale
        self.per_shard_scalars = frozenset({"weight_scale", "input_scale"} if static_input_scale else {"weight_scale"})

    def create_weights(self, layer, in_per_rank, out_per_rank, dtype=None):
        n = len(shard_sizes(layer, out_per_rank))
        layer.weight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=FP8), requires_grad=False)
        layer.register_buffer("weight_scale", torch.empty(n, dtype=torch.float32))
        if self.static:
            layer.register_buffer("input_scale", torch.empty(n, dtype=torch.float32))

    def layer_tensors(self, layer):
        names = ("weight", "weight_scale", "input_scale") if self.static else ("weight", "weight_scale")
        return {k: getattr(layer, k) for k in names}

    def checkpoint_tensors(self, layer):
        return self.layer_tensors(layer)

    def _input_scale(self, layer, x2: torch.Tensor, spans) -> torch.Tensor:
        if not self.static:  # aminmax: one pass, no |x| temporary the size of x
            lo, hi = torch.aminmax(x2)
            return torch.maximum(-lo, hi).float().clamp_min(1e-12) / FP8_MAX
        if len(spans) == 1:
            i = spans[0][0]
            return layer.input_scale[i]
        return layer.input_scale[spans[0][0]:spans[-1][0] + 1].amax()

    def apply(self, layer, x, bias=None, out_rows=None):
        w = narrow_rows(layer.weight, out_rows)
        shape = x.shape
        if x.numel() == 0:  # as F.linear (an SP rank may hold no tokens); _scaled_mm refuses 0 rows
            return x.new_empty(*shape[:-1], w.shape[0])
        x2 = x.reshape(-1, shape[-1])
        spans = _spans(shard_sizes(layer, layer.weight.shape[0]), out_rows)
        xs = self._input_scale(layer, x2, spans)
        xq = quantize_input(x2, xs)
        if len(spans) == 1:  # per-tensor scales; output in x's dtype, as ltx-core's FP8Linear
            y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=layer.weight_scale[spans[0][0]],
                                 out_dtype=x.dtype, use_fast_accum=FAST_ACCUM)
        else:  # shards with their own weight scales: row-wise scales, one GEMM (CUDA writes bf16 only)
            y = torch._scaled_mm(xq, w.t(), scale_a=xs.expand(x2.shape[0], 1).contiguous(),
                                 scale_b=row_scales(layer.weight_scale, spans)[None],
                                 out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
        if bias is not None:
            y = y + narrow_rows(bias, out_rows)
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)

    @torch.no_grad()
    def quantize(self, layer: LinearBase, input_amax: torch.Tensor | None = None) -> None:
        """A loaded layer (its bf16 weight in `weight`) -> this method: per shard, the scale of the
        whole checkpoint tensor (max over TP ranks). Static: `input_amax` (shards,) from calibration."""
        w = layer.weight
        sizes = shard_sizes(layer, w.shape[0])
        parts = list(w.split(sizes))
        amax = tp_amax(torch.stack([p.float().abs().amax() for p in parts]), layer)
        quantized = [quantize_per_tensor(p, a) for p, a in zip(parts, amax)]
        if self.static and input_amax is None:
            raise ValueError("static input scales need input_amax (calibration); use FP8_SCALED_MM_DYNAMIC")
        with torch.device(w.device):
            self.create_weights(layer, w.shape[1], w.shape[0])
        layer.weight.copy_(torch.cat([q for q, _ in quantized]))
        layer.weight_scale.copy_(torch.stack([s for _, s in quantized]))
        if self.static:
            layer.input_scale.copy_(input_amax.float().clamp_min(1e-12).expand(len(sizes)) / FP8_MAX)
        layer.quant_method = self


FP8_SCALED_MM = Fp8PerTensorLinearMethod(static_input_scale=True)
FP8_SCALED_MM_DYNAMIC = Fp8PerTensorLinearMethod(static_input_scale=False)
