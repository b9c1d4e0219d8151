"""GPU correctness before any timing: the tiny model on CUDA vs ltx-core on CUDA (fp32 and bf16),
chunked and unchunked, which also exercises the CUDA log-sum-exp attention kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from reference import build_ltx_core, make_inputs, rel_err, run_ltx_core, tiny_config  # noqa: E402

from ltx2_tp.layers import attention_backend  # noqa: E402
from ltx2_tp.memory.plan import ExecutionPlan  # noqa: E402
from ltx2_tp.models.ltx2.weights import build_model  # noqa: E402


def to(m, dev, dtype):
    from dataclasses import replace

    if m is None:
        return None
    return replace(m, latent=m.latent.to(dev, dtype), context=m.context.to(dev, dtype), sigma=m.sigma.to(dev),
                   timesteps=m.timesteps.to(dev), positions=m.positions.to(dev),
                   context_mask=None if m.context_mask is None else m.context_mask.to(dev))


def main():
    dev = torch.device("cuda")
    worst = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for kw in (dict(), dict(rope_type="split", double_precision_rope=True, apply_gated_attention=True,
                                cross_attention_adaln=True, caption_projection=False)):
            cfg = tiny_config(**kw).replace(num_attention_heads=4, attention_head_dim=64, audio_attention_head_dim=32,
                                            cross_attention_dim=256, audio_cross_attention_dim=128)
            ref = build_ltx_core(cfg).to(dev, dtype)
            ours = build_model(cfg, device=dev, dtype=dtype, state_dict=ref.state_dict())
            v, a = make_inputs(cfg, frames=5, h=6, w=9, audio_tokens=17)
            v, a = to(v, dev, dtype), to(a, dev, dtype)
            rv, ra = run_ltx_core(ref, v, a)
            for plan in (ExecutionPlan(), ExecutionPlan(ffn_chunk_tokens=50, attn_chunk_tokens=37, cache_rope=False)):
                ov, oa = ours(v, a, plan=plan)
                e = max(rel_err(ov, rv), rel_err(oa, ra))
                key = f"{dtype} {sorted(kw)} {plan.describe()}"
                worst[key] = e
                print(f"{key}: rel err {e:.2e} (lse kernels: {attention_backend._LSE_KERNEL})", flush=True)
                assert e <= tol, key
    print("GPU parity OK")


if __name__ == "__main__":
    main()
