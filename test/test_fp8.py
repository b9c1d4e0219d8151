"""fp8 linears: the kernel call equals its dequantized reference, and a quantized model stays
close to the bf16 model (a bounded, nonzero quality cost)."""

from __future__ import annotations

import torch
from reference import make_inputs, rel_err, tiny_config

from ltx2_tp.layers.fp8 import FP8, fp8_linear, quantize_fp8, quantize_rows
from ltx2_tp.models.ltx2.lora import LoraWeights, lora_applied
from ltx2_tp.models.ltx2.weights import build_model


def test_fp8_linear_equals_dequantized_matmul():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    wq, ws = quantize_rows(w)
    assert wq.dtype == FP8 and ws.shape == (48, 1)
    y = fp8_linear(x, wq, ws.t().contiguous(), b)
    xq, xs = quantize_rows(x.reshape(-1, 64))
    ref = ((xq.float() * xs) @ (wq.float() * ws).t() + b.float()).reshape(3, 37, 48)
    assert y.shape == (3, 37, 48) and y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < 1e-2  # bf16 output rounding only
    assert rel_err(y.float(), (x.float() @ w.float().t() + b.float())) < 6e-2  # e4m3: 3 mantissa bits


def test_quantized_model_close_to_bf16():
    cfg = tiny_config()
    ref = build_model(cfg, dtype=torch.bfloat16, seed=3)
    q = build_model(cfg, dtype=torch.bfloat16, seed=3)
    n = quantize_fp8(q)
    fp8 = [m for m in q.modules() if hasattr(m, "weight_fp8")]
    assert n == len(fp8) >= 10 * cfg.num_layers
    assert all(m.weight.numel() == 0 and m.weight_fp8.dtype == FP8 for m in fp8)  # bf16 copies freed
    v, a = make_inputs(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        rv, ra = ref(v, a)
        qv, qa = q(v, a)
    ev, ea = rel_err(qv.float(), rv.float()), rel_err(qa.float(), ra.float())
    assert 0 < ev < 0.1 and 0 < ea < 0.1, (ev, ea)
    lora = LoraWeights({"transformer_blocks.0.ff.net.2.weight": (torch.zeros(1, 128), torch.zeros(32, 1))})
    try:
        with lora_applied(q, lora):
            raise AssertionError("LoRA fused into fp8 weights")
    except ValueError as e:
        assert "fp8" in str(e)
