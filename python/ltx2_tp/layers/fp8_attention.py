"""`--attention fp8` and its variants: 8-bit attention (fp8_attention_kernel.py) behind one torch
custom op, so that compiled blocks trace through it without a graph break. Opt-in approximations:
their deviation from bf16 attention is measured by benchmark/bench_attention.py (random and
outlier data) and, on a whole step, by benchmark/bench_dit.py --attention NAME.

| name     | Q.K^T  | P.V  | note |
|----------|--------|------|------|
| fp8      | e4m3   | e4m3 | both products at the 8-bit MMA rate (FlashAttention-3 fp8's formats) |
| fp8_qk   | e4m3   | bf16 | P.V at the bf16 rate (at most ~1.33x on the MMAs) |
| int8_fp8 | int8   | e4m3 | SageAttention2's formats on Hopper: same MMA rate as fp8, Q.K^T error 2-3x smaller on normal data |
| int8_qk  | int8   | bf16 | |

What runs quantized: attention with head dim 128 (the video stream), no mask and at least
MIN_KEYS keys, through `attention` and `attention_lse`: the video self-attention on one GPU and in
the ring, Ulysses and chunked paths. The rest stays on bf16 SDPA: head dim 64 (the audio stream,
few tokens), masked calls, and short key sets such as the ~1K text tokens of the cross-attention,
where 8 bits would save < 3% of the attention time at 32K video tokens and add their error to the
prompt's conditioning.
On CPU tensors the op runs the pure-torch emulation (fp8_attention_ref.py): tests only;
set_attention_backend refuses these names without a CUDA GPU of compute capability >= 8.9.
"""

from __future__ import annotations

import functools
import os

import torch

from ltx2_tp.layers.fp8_attention_ref import fp8_attention_reference

FORMATS = {"fp8": (False, True), "fp8_qk": (False, False), "int8_fp8": (True, True), "int8_qk": (True, False)}
HEAD_DIMS = (128,)  # head dims that go quantized (the kernel also takes 64)
MIN_KEYS = 2048
CONFIG_ENV = "LTX2_TP_FP8_ATTN_CONFIG"


def unavailable_reason() -> str | None:
    """Why the quantized kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU, and none is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"needs a GPU with 8-bit tensor cores (compute capability >= 8.9: Ada, Hopper), this one has {major}.{minor}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs triton (installed with torch's CUDA wheels, or: pip install triton)"
    return None


@functools.cache
def kernel_config(qk_int8: bool, fp8_v: bool, capability: tuple[int, int]):
    from ltx2_tp.layers.fp8_attention_kernel import DEFAULT_CONFIGS, parse_config

    env = os.environ.get(CONFIG_ENV)
    cfg = parse_config(env) if env else DEFAULT_CONFIGS[(qk_int8, fp8_v)]
    if capability < (9, 0) and cfg.tma:  # TMA descriptors are Hopper's
        from dataclasses import replace

        cfg = replace(cfg, tma=False)
    return cfg


@torch.library.custom_op("ltx2_tp::quantized_attention", mutates_args=())
def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_int8: bool,
                        fp8_v: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Nq, H, d) x (B, Nk, H, d) -> out (B, Nq, H, d) contiguous in q's dtype, lse (B, H, Nq) fp32.
    Forward only (inference: no autograd formula)."""
    if q.is_cuda:
        from ltx2_tp.layers.fp8_attention_kernel import attention_fwd

        cfg = kernel_config(qk_int8, fp8_v, torch.cuda.get_device_capability(q.device))
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return attention_fwd(q, k, v, qk_int8, fp8_v, cfg)
    out, lse = fp8_attention_reference(q, k, v, 128, fp8_v, qk_int8)
    return out.contiguous(), lse


@quantized_attention.register_fake
def _(q, k, v, qk_int8, fp8_v):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def quantized_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            name: str) -> tuple[torch.Tensor, torch.Tensor]:
    qk_int8, fp8_v = FORMATS[name]
    return quantized_attention(q, k, v, qk_int8, fp8_v)
