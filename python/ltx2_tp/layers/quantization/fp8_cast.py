"""fp8 storage, bf16 compute: ltx-core's `fp8_cast` (weights kept in e4m3, upcast at each use).

Half the weight memory of bf16 (19B: 0.39 instead of 0.77 GB a block) without fp8 activations: the
matmul is the model dtype's F.linear on the upcast weight, so the only error is the e4m3 rounding
of the weights (3 mantissa bits). The upcast is one extra pass over the weight per call (a bf16
copy of one weight alive at a time: 128 MiB for the 19B FFN).

ltx-core's fp8_cast, mirrored (ltx_core/quantization/fp8_cast.py, 1.0.0):
- a bf16 checkpoint is cast on load, no scale: `w.to(e4m3)`, for to_q/to_k/to_v, to_out.0,
  ff.net.0.proj and ff.net.2 of every block (audio and audio<->video too; not the gate logits) -
  and their biases too, so a bias here is rounded through e4m3 once (kept in the model dtype: a
  row-parallel layer adds it after its all-reduce);
- an fp8 checkpoint with per-tensor `weight_scale` (Lightricks' fp8 files, fp8_scaled_mm format)
  is upcast as w * weight_scale (ltx-core main, PR 172), its `input_scale` loaded and unused
  (FP8_CAST_SCALED; FP8_CAST_WEIGHT_SCALED for files without input scales);
- a LoRA is fused into the e4m3 weight: bf16(w) + delta rounded back to e4m3, with stochastic
  rounding on CUDA (ltx-core's fused_add_round_kernel: +-half an e4m3 ulp of noise before the
  rounding, so deltas under half an ulp - most of a LoRA's - survive in expectation) and to
  nearest elsewhere (ltx-core's CPU path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltx2_tp.layers.linear import LinearBase
from ltx2_tp.layers.quantization.base import LinearMethodBase, narrow_rows
from ltx2_tp.layers.quantization.fp8_per_tensor import FP8, FP8_MAX, _spans, row_scales, shard_sizes

#: LoRA rounding: "auto" (ltx-core's choice: stochastic on CUDA, nearest elsewhere), "stochastic", "nearest"
LORA_ROUNDING = "auto"
LORA_SEED = 0  # ltx-core's kernel: seed 0 for every tensor


def cast_to_fp8(t: torch.Tensor) -> torch.Tensor:
    """ltx-core's downcast (`t.to(e4m3)`), saturating as it does on the CPU (CUDA would give NaN past 448)."""
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def e4m3_ulp(x: torch.Tensor) -> torch.Tensor:
    """The e4m3 spacing at fp16 values `x`, as ltx-core's fused_add_round_kernel computes it (from
    the fp16 exponent, clamped to e4m3's range; 0 at 0)."""
    e16 = (x.view(torch.int16).int() & 0x7C00) >> 10
    exponent = (torch.where(e16 > 0, e16 - 15, torch.full_like(e16, -14)) + 7).clamp(0, 15)  # e4m3 bias 7
    ulp = torch.where(exponent > 0, torch.exp2((exponent - 10).float()), torch.full_like(exponent, 2.0 ** -9, dtype=torch.float32))
    return torch.where(x == 0, torch.zeros_like(ulp), ulp)


def fuse_into_fp8(w: torch.Tensor, delta: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """e4m3 `w` + bf16 `delta` -> e4m3, as ltx-core's fp8_cast LoRA fusion. noise None: to nearest,
    bf16(w) + delta in bf16 then cast (its CPU path). noise U[0,1) of w's shape: stochastic, fp16(w) +
    fp16(delta) + (noise - 0.5) * ulp in fp32, to bf16, then cast (its CUDA kernel, other random numbers).
    Where delta is 0 the weight is kept (rows of other shards of a fused layer)."""
    if noise is None:
        fused = w.to(torch.bfloat16) + delta.to(torch.bfloat16)
    else:
        x = w.to(torch.float16) + delta.to(torch.float16)
        fused = (x.float() + (noise.float() - 0.5) * e4m3_ulp(x)).to(torch.bfloat16)
    return torch.where(delta == 0, w, cast_to_fp8(fused))


class Fp8CastLinearMethod(LinearMethodBase):
    """`weight` e4m3 (out, k); from a scaled checkpoint also its `scales` (shards,) fp32: weight_scale,
    and input_scale where the file has one (loaded, unused)."""

    def __init__(self, scales: tuple[str, ...] = ()):
        self.scales, self.scaled = scales, bool(scales)
        self.per_shard_scalars = frozenset(scales)

    def create_weights(self, layer, in_per_rank, out_per_rank, dtype=None):
        layer.weight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=FP8), requires_grad=False)
        n = len(shard_sizes(layer, out_per_rank))
        for name in self.scales:
            layer.register_buffer(name, torch.empty(n, dtype=torch.float32))

    def layer_tensors(self, layer):
        return {k: getattr(layer, k) for k in ("weight", *self.scales)}

    def checkpoint_tensors(self, layer):
        return self.layer_tensors(layer)

    def _row_scales(self, layer, out_rows) -> torch.Tensor:
        return row_scales(layer.weight_scale, _spans(shard_sizes(layer, layer.weight.shape[0]), out_rows))

    def weight_for(self, layer, dtype: torch.dtype, out_rows=None) -> torch.Tensor:
        """The upcast weight (rows `out_rows`) in `dtype`."""
        w = narrow_rows(layer.weight, out_rows)
        if not self.scaled:
            return w.to(dtype)
        return (w.float() * self._row_scales(layer, out_rows)[:, None]).to(dtype)  # one rounding, fp32 scale

    def apply(self, layer, x, bias=None, out_rows=None):
        return F.linear(x, self.weight_for(layer, x.dtype, out_rows), narrow_rows(bias, out_rows))

    def add_lora_(self, layer, weight, delta, local):
        d = local(delta.to(torch.bfloat16))  # ltx-core: deltas in bf16 for an fp8 weight
        if self.scaled:  # the delta in the weight's own units; the scale stays (valid on every TP rank)
            d = torch.where(d == 0, d, (d.float() / self._row_scales(layer, None)[:, None]).to(torch.bfloat16))
        stochastic = LORA_ROUNDING == "stochastic" or (LORA_ROUNDING == "auto" and weight.is_cuda)
        noise = None
        if stochastic:  # drawn at the checkpoint tensor's size and cut like it: TP ranks get the single-rank bits
            g = torch.Generator(device=delta.device).manual_seed(LORA_SEED)
            noise = local(torch.rand(delta.shape, generator=g, device=delta.device))
        weight.copy_(fuse_into_fp8(weight, d, noise))

    @torch.no_grad()
    def cast(self, layer: LinearBase) -> None:
        """A loaded bf16 layer -> e4m3 storage (ltx-core's downcast; the bias rounded through e4m3)."""
        if self.scaled:
            raise ValueError("FP8_CAST_SCALED holds an fp8 checkpoint's scaled weights; cast a bf16 layer with FP8_CAST")
        w = layer.weight
        with torch.device(w.device):
            self.create_weights(layer, w.shape[1], w.shape[0])
        layer.weight.copy_(cast_to_fp8(w))
        if layer.bias is not None:
            layer.bias.copy_(cast_to_fp8(layer.bias).to(layer.bias.dtype))
        layer.quant_method = self


FP8_CAST = Fp8CastLinearMethod()
FP8_CAST_SCALED = Fp8CastLinearMethod(("weight_scale", "input_scale"))  # Lightricks' files
FP8_CAST_WEIGHT_SCALED = Fp8CastLinearMethod(("weight_scale",))  # scaled files without input scales
