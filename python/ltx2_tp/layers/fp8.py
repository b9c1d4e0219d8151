"""fp8 (e4m3) linears: weights quantized once per output row, activations per token on the fly,
one `torch._scaled_mm` with row-wise scales (H100: about 1.5-1.9x the bf16 GEMM rate).

`quantize_fp8(model)` turns every parallel linear inside the DiT blocks (attention q/k/v/out,
FFN, text and audio<->video cross-attention) to fp8 and frees their bf16 weights; embeddings,
AdaLN and the output projection stay in bf16. The TP sharding is untouched: each rank quantizes
its own shard (scales are per output row: a column split gives exactly the numbers
one rank would; row-parallel shards, split along k, get their own row scales, so TP=2 differs from one
rank by quantization noise only). The quality cost is measured, not assumed (benchmark/bench_dit.py --fp8,
test/test_fp8.py).
"""

from __future__ import annotations

import torch
from torch import nn

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
    xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
    y = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=weight_scale, out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What every parallel linear calls: fp8 once quantized, else F.linear."""
    w8 = getattr(layer, "weight_fp8", None)
    if w8 is not None:
        return fp8_linear(x, w8, layer.weight_scale, bias)
    return nn.functional.linear(x, layer.weight, bias)


@torch.no_grad()
def quantize_fp8(model: nn.Module) -> int:
    """Quantize the parallel linears inside `model.transformer_blocks`; returns how many."""
    from ltx2_tp.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear

    n = 0
    for mod in model.transformer_blocks.modules():
        if isinstance(mod, (ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear)):
            if mod.weight.shape[0] % 16 or mod.weight.shape[1] % 16:  # _scaled_mm's shape rule
                continue
            q, s = quantize_rows(mod.weight)
            mod.register_buffer("weight_fp8", q)
            mod.register_buffer("weight_scale", s.t().contiguous())  # (1, rows): scale_b
            mod.weight = nn.Parameter(torch.empty(0, device=q.device, dtype=mod.weight.dtype), requires_grad=False)
            n += 1
    model.fp8 = True
    return n
