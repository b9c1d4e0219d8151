"""The one place that decides the attention kernel.

Layout everywhere in ltx2_tp is token-major (B, N, H, d); kernels get (B, H, N, d) views.
Backends: "auto" (cuDNN first on CUDA: 644 TFLOP/s vs 365 for the FA2 backend at 32K tokens on
an H100, anchors.md), "cudnn", "flash", "efficient", "math" (torch SDPA with that kernel),
"flash_attn" / "flashinfer" when those packages are installed, and the opt-in 8-bit
approximations "fp8", "fp8_qk", "int8_fp8", "int8_qk" (fp8_attention.py: head dim 128, no mask,
>= 2048 keys; other calls stay on SDPA).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ltx2_tp.layers.fp8_attention import FORMATS as QUANTIZED
from ltx2_tp.layers.fp8_attention import HEAD_DIMS as _QUANTIZED_HEAD_DIMS
from ltx2_tp.layers.fp8_attention import MIN_KEYS as _QUANTIZED_MIN_KEYS
from ltx2_tp.layers.fp8_attention import quantized_attention_lse, unavailable_reason
from ltx2_tp.memory.plan import token_chunks
from ltx2_tp.profiling import nvtx_range

_BACKEND = "auto"
_SDPA_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
BACKENDS = ("auto", *_SDPA_NAMES, "flash_attn", "flashinfer", *QUANTIZED)


def set_attention_backend(name: str) -> None:
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "flash_attn":
        import flash_attn  # noqa: F401  (fail now, not mid-step)
    if name == "flashinfer":
        import flashinfer  # noqa: F401
    if name in QUANTIZED and (reason := unavailable_reason()):
        raise ValueError(f"--attention {name}: {reason}")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


def _quantized(q: torch.Tensor, k: torch.Tensor, mask) -> bool:
    """The 8-bit path takes unmasked calls at head dim 128 over >= 2048 keys (fp8_attention.py)."""
    return (_BACKEND in QUANTIZED and mask is None and q.shape[-1] in _QUANTIZED_HEAD_DIMS
            and k.shape[1] >= _QUANTIZED_MIN_KEYS)


def _sdpa_context(device: torch.device):
    if device.type != "cuda" or _BACKEND not in ("auto", *_SDPA_NAMES):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _BACKEND == "auto":
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel([getattr(SDPBackend, _SDPA_NAMES[_BACKEND])])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Nq, H, d) x (B, Nk, H, d) -> (B, Nq, H, d). mask: additive, broadcastable to (B, H, Nq, Nk)."""
    with nvtx_range("attention"):
        if _quantized(q, k, mask):
            return quantized_attention_lse(q, k, v, _BACKEND)[0]
        if mask is None and q.is_cuda and _BACKEND == "flash_attn":
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v)
        if mask is None and q.is_cuda and _BACKEND == "flashinfer":
            import flashinfer

            b = q.shape[0]
            return torch.stack([flashinfer.single_prefill_with_kv_cache(q[i], k[i], v[i]) for i in range(b)])
        with _sdpa_context(q.device):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


def local_attention(q, k, v, q_chunk: int | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`attention` with the queries in chunks of `q_chunk` against the full K/V; each chunk's output
    is written over its rows (the whole score matrix of one chunk at a time)."""
    chunks = token_chunks(q.shape[1], q_chunk)
    if len(chunks) == 1:
        return attention(q, k, v, mask)
    out = torch.empty_like(q)
    for s, e in chunks:
        m = None if mask is None else mask[..., s:e, :]
        out[:, s:e] = attention(q[:, s:e], k, v, m)
    return out


_LSE_KERNEL: dict[torch.dtype, str] = {}
# cuDNN and FA2 kernels take fp16/bf16 only (cuDNN silently returns garbage for fp32, seen on an
# H100 with torch 2.11), so fp32 goes to the memory-efficient kernel.
_LSE_ORDER = {torch.float16: ("cudnn", "flash", "efficient", "math"), torch.bfloat16: ("cudnn", "flash", "efficient", "math")}


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of the scores: out (B, Nq, H, d), lse (B, H, Nq) fp32.

    Used where partial results over K/V blocks are merged (ring attention, audio queries over
    sequence-split video keys).
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    nq = q.shape[1]
    with nvtx_range("attention_lse"):
        if _quantized(q, k, None):
            return quantized_attention_lse(q, k, v, _BACKEND)
        if not q.is_cuda:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False)[:2]
            return out.transpose(1, 2), lse.float()
        known = _LSE_KERNEL.get(q.dtype)
        for name in (known,) if known else _LSE_ORDER.get(q.dtype, ("efficient", "math")):
            try:
                out, lse = _cuda_lse(name, qt, kt, vt)
            except (RuntimeError, NotImplementedError):
                continue
            lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :nq].float()
            # first call per dtype: a kernel that returns a non-finite LSE is skipped (one sync, once;
            # never inside a compiled graph, where it would break the graph)
            if known is None and not torch.compiler.is_compiling() and not bool(torch.isfinite(lse).all()):
                continue
            _LSE_KERNEL[q.dtype] = name
            return out.transpose(1, 2), lse
    raise RuntimeError("no attention kernel with log-sum-exp output available")


def _cuda_lse(name: str, q, k, v):
    if name == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    if name == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    if name == "efficient":
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    lse = s.logsumexp(-1)
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), lse


class LseAccumulator:
    """Merges partial attention results over K/V blocks: fp32 running output and log-sum-exp."""

    def __init__(self):
        self.out: torch.Tensor | None = None  # (B, N, H, d) fp32
        self.lse: torch.Tensor | None = None  # (B, H, N) fp32

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out.float(), lse.clone()
            return
        new = torch.logaddexp(self.lse, lse)
        w_old = torch.exp(self.lse - new).transpose(1, 2).unsqueeze(-1)
        w_new = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)
        self.out.mul_(w_old).add_(out.float() * w_new)
        self.lse = new
