"""fp8 (e4m3) linears: weights quantized once per output row, activations per token on the fly,
one `torch._scaled_mm` with row-wise scales (H100: about 1.5-1.9x the bf16 GEMM rate).

`quantize_fp8(model)` gives every parallel linear inside the DiT blocks (attention q/k/v/out,
FFN, text and audio<->video cross-attention) the fp8 method below and frees their bf16 weights;
embeddings, AdaLN and the output projection stay in bf16. The TP sharding is untouched: each rank
quantizes its own shard (scales are per output row: a column split gives exactly the numbers
one rank would; row-parallel shards, split along k, get their own row scales, so TP=2 differs from one
rank by quantization noise only). The quality cost is measured, not assumed (benchmark/bench_dit.py --fp8,
test/test_fp8.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ltx2_tp.layers.linear import LinearBase
from ltx2_tp.layers.quantization.base import LinearMethodBase, narrow_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, k) -> fp8 values and fp32 scales (rows, 1), one scale per row (amax / 448)."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., k) in bf16 -> (..., n): per-token activation scales, per-row weight scales."""
    shape = x.shape
    if x.numel() == 0:  # as F.linear (an SP rank may hold no tokens); _scaled_mm refuses 0 rows
        return x.new_empty(*shape[:-1], weight_fp8.shape[0])
    xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
    y = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=weight_scale, out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


class Fp8RowwiseLinearMethod(LinearMethodBase):
    """`weight_fp8` (out, k) e4m3 with `weight_scale` (1, out) fp32, one per output row; the bf16
    `weight` stays registered, empty (a LoRA cannot be added to it: fuse LoRAs before quantizing)."""

    supports_lora = False

    def create_weights(self, layer, in_per_rank, out_per_rank, dtype=None):
        layer.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        layer.register_buffer("weight_fp8", torch.empty(out_per_rank, in_per_rank, dtype=FP8))
        layer.register_buffer("weight_scale", torch.empty(1, out_per_rank, dtype=torch.float32))  # scale_b

    def apply(self, layer, x, bias=None, out_rows=None):
        return fp8_linear(x, narrow_rows(layer.weight_fp8, out_rows), narrow_rows(layer.weight_scale, out_rows, dim=1),
                          narrow_rows(bias, out_rows))

    def layer_tensors(self, layer):
        return {"weight_fp8": layer.weight_fp8, "weight_scale": layer.weight_scale}

    @torch.no_grad()
    def quantize(self, layer: LinearBase) -> None:
        """Turn a loaded layer (any other method, its weights in `weight`) into this method."""
        q, s = quantize_rows(layer.weight)
        with torch.device(q.device):
            self.create_weights(layer, q.shape[1], q.shape[0], layer.weight.dtype)
        layer.weight_fp8.copy_(q)
        layer.weight_scale.copy_(s.t())
        layer.quant_method = self


FP8_ROWWISE = Fp8RowwiseLinearMethod()


@torch.no_grad()
def quantize_fp8(model: nn.Module) -> int:
    """Quantize the parallel linears inside `model.transformer_blocks`; returns how many."""
    n = 0
    for mod in model.transformer_blocks.modules():
        if isinstance(mod, LinearBase) and mod.quant_method is not FP8_ROWWISE:
            rows, k = mod.weight.shape
            if rows % 16 or k % 16:  # _scaled_mm's shape rule
                continue
            FP8_ROWWISE.quantize(mod)
            n += 1
    return n
