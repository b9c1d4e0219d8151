"""The fp8 attention path's bookkeeping in pure torch: the quantization of Q, K and V, and an
emulation of the Triton kernel's blockwise online softmax (fp8_attention_kernel.py) on the same
rounded operands, in fp32. CPU tests hold it against fp32 attention; the kernel is held against
it (TRITON_INTERPRET on CPU, `benchmark/bench_attention.py --smoke` on the GPU).

Layout in and out as attention_lse: q/k/v (B, N, H, d); out (B, Nq, H, d), lse (B, H, Nq) fp32,
natural log of the sum of exp(q.k / sqrt(d)).

Formats: Q and K in e4m3 (3 mantissa bits) or int8 (SageAttention's choice for QK: on random
normal data its QK error is ~3x smaller than e4m3's at the same Hopper MMA rate); P and V in e4m3
(`fp8_v`) or left in V's dtype.
Scales:
- Q: one per token and head (a row vector on the score tile: free in the kernel).
- K: its per-head mean over the call's tokens is subtracted first (SageAttention's smoothing:
  q.(k - c) = q.k - q.c shifts every score of a query row alike, so softmax is unchanged; the LSE
  gets q.c back), then one scale per block of `block_n` keys (a scalar per score tile).
- V (fp8_v): per channel, after subtracting the channel's mean over tokens (exact: softmax rows
  sum to 1, so P(V - c) + c = PV). The mean, not the midrange: e4m3 is finest near zero, and with
  a few 10-50x tokens the midrange moves the bulk of the channel far from it (rel. RMS error 0.23
  vs 0.17 on bench_attention.py's `qknorm` data, 0.47 vs 0.19 on `outliers`).
- P (fp8_v): exp2(s - m + 8), i.e. P * 2^8 in [0, 256] (exact in e4m3), so probabilities down to
  2^-14 stay normal; the same factor is in the row sum, so it cancels.
Scores are kept in log2 units (log2(e) / sqrt(d) folded into the Q scale), as the kernel's exp2.
Rounding: e4m3 to nearest even, saturating at 448 (the GPU's cvt.satfinite); int8 as
floor(x + 0.5), clamped to +-127 (one formula in kernel and reference).
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
P_SHIFT = 8.0  # P is stored as P * 2^P_SHIFT (max 256: exact in e4m3, no saturation)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
AMAX_MIN = 1e-12  # an all-zero row/block/channel gets a tiny scale instead of 0/0


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to e4m3 (nearest-even), saturating at +-448 as the GPU's cvt.satfinite does."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def to_int8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 (already within +-127) to int8: floor(x + 0.5), the kernel's formula."""
    return torch.floor(x + 0.5).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _codes(x: torch.Tensor, amax: torch.Tensor, int8: bool) -> torch.Tensor:
    """x / amax onto the format's grid: e4m3 over +-448 or int8 over +-127."""
    return to_int8(x * INT8_MAX / amax) if int8 else to_fp8(x * FP8_MAX / amax)


def score_scale(head_dim: int) -> float:
    """1/sqrt(d) in log2 units: scores go to exp2."""
    return LOG2E / math.sqrt(head_dim)


def k_mean(k: torch.Tensor) -> torch.Tensor:
    """Per-head channel mean of K over its tokens: (B, N, H, d) -> (B, H, d) fp32, one pass."""
    return torch.mean(k, dim=1, dtype=torch.float32)


def v_shift_scale(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head, per-channel mean of V and the scale of V minus it: (B, N, H, d) -> two (B, H, d)
    fp32, two passes (mean, aminmax)."""
    mean = torch.mean(v, dim=1, dtype=torch.float32)
    lo, hi = torch.aminmax(v, dim=1)
    return mean, torch.maximum(hi.float() - mean, mean - lo.float()).clamp_min(AMAX_MIN) / FP8_MAX


def quantize_q(q: torch.Tensor, sm_log2: float, int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, H, d) -> codes (B, H, N, d) and the per-token score scale (B, H, N) = q_scale * sm_log2."""
    qmax = INT8_MAX if int8 else FP8_MAX
    qf = q.float().transpose(1, 2)
    amax = qf.abs().amax(-1).clamp_min(AMAX_MIN)
    return _codes(qf, amax[..., None], int8), amax * (sm_log2 / qmax)


def quantize_k(k: torch.Tensor, mean: torch.Tensor, block_n: int, int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, H, d) minus `mean` -> codes (B, H, Np, d), Np = N padded to block_n with zero rows,
    and one scale per block (B, H, Np / block_n)."""
    b, n, h, d = k.shape
    npad = -(-n // block_n) * block_n
    ks = torch.zeros(b, h, npad, d, device=k.device)
    ks[:, :, :n] = k.float().transpose(1, 2) - mean[:, :, None]
    blocks = ks.view(b, h, npad // block_n, block_n, d)
    amax = blocks.abs().amax((-1, -2)).clamp_min(AMAX_MIN)
    codes = _codes(blocks, amax[..., None, None], int8).view(b, h, npad, d)
    return codes, amax / (INT8_MAX if int8 else FP8_MAX)


def quantize_v(v: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, block_n: int) -> torch.Tensor:
    """(B, N, H, d) -> e4m3 (B, H, d, Np), transposed (Hopper's fp8 MMA wants the PV operand
    k-major) and padded with zero columns to a multiple of block_n."""
    b, n, h, d = v.shape
    npad = -(-n // block_n) * block_n
    v8 = torch.zeros(b, h, d, npad, dtype=FP8, device=v.device)
    vt = (v.float() - shift[:, None]) / scale[:, None]  # (B, N, H, d)
    v8[..., :n] = to_fp8(vt).permute(0, 2, 3, 1)
    return v8


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 128,
                            fp8_v: bool = True, qk_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic, step by step, in fp32 on CPU or GPU tensors.

    fp8_v=False: P and V stay in V's dtype (bf16), only Q.K^T is quantized.
    """
    b, nq, h, d = q.shape
    nk = k.shape[1]
    sm_log2 = score_scale(d)
    q8, rs = quantize_q(q, sm_log2, qk_int8)
    mean = k_mean(k)
    k8, ks = quantize_k(k, mean, block_n, qk_int8)
    qc = torch.einsum("bnhd,bhd->bhn", q.float(), mean) * sm_log2  # the smoothing's share of each score
    if fp8_v:
        shift, vscale = v_shift_scale(v)
        vb = quantize_v(v, shift, vscale, block_n).float().transpose(-1, -2)  # (B, H, Np, d)
        pshift = P_SHIFT
    else:
        vb = torch.zeros(b, h, k8.shape[2], d, device=v.device)
        vb[:, :, :nk] = v.transpose(1, 2).float()
        pshift = 0.0
    qf = q8.float()
    m = torch.full((b, h, nq), -math.inf, device=q.device)
    l = torch.zeros(b, h, nq, device=q.device)
    acc = torch.zeros(b, h, nq, d, device=q.device)
    cols = torch.arange(block_n, device=q.device)
    for j in range(k8.shape[2] // block_n):
        s = qf @ k8[:, :, j * block_n:(j + 1) * block_n].float().transpose(-1, -2)  # (B, H, Nq, bn)
        scale = rs * ks[:, :, j, None]
        s = torch.where(j * block_n + cols < nk, s, -math.inf)
        m_new = torch.maximum(m, s.amax(-1) * scale)
        p = torch.exp2(s * scale[..., None] - (m_new - pshift)[..., None])
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        p_op = to_fp8(p).float() if fp8_v else p.to(v.dtype).float()
        acc = acc * alpha[..., None] + p_op @ vb[:, :, j * block_n:(j + 1) * block_n]
        m = m_new
    out = acc / l[..., None]
    if fp8_v:
        out = out * vscale[:, :, None] + shift[:, :, None]
    lse = (m - pshift + torch.log2(l) + qc) * LN2
    return out.transpose(1, 2).to(q.dtype), lse


def dequantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 128,
                          fp8_v: bool = True, qk_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 softmax attention on the dequantized operands (no blockwise loop, P unrounded):
    what the kernel computes up to the rounding of P (fp8_v) and the order of fp32 sums."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    sm_log2 = score_scale(d)
    q8, rs = quantize_q(q, sm_log2, qk_int8)
    mean = k_mean(k)
    k8, ks = quantize_k(k, mean, block_n, qk_int8)
    kd = (k8.float().view(b, h, -1, block_n, d) * ks[..., None, None]).view(b, h, -1, d)[:, :, :nk]
    s2 = (q8.float() * rs[..., None]) @ kd.transpose(-1, -2)  # log2 units
    s2 = s2 + (torch.einsum("bnhd,bhd->bhn", q.float(), mean) * sm_log2)[..., None]
    if fp8_v:
        shift, vscale = v_shift_scale(v)
        v8 = quantize_v(v, shift, vscale, block_n)[..., :nk]
        vd = (v8.float() * vscale[..., None] + shift[..., None]).transpose(-1, -2)
    else:
        vd = v.float().transpose(1, 2)
    out = torch.softmax(s2 * LN2, -1) @ vd
    return out.transpose(1, 2), torch.logsumexp(s2 * LN2, -1)
