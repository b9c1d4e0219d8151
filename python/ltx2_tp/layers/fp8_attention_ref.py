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
Rounding: x * (max / amax), the reciprocal by one IEEE division per row / block / channel and then
a multiply, in kernel and emulation alike, so the codes are bit-identical: Triton's `/` is
div.full.f32 (within 2 ulps), and on bf16 inputs ~0.5% of x * 448 / amax are exact rounding ties
that an ulp moves to the other neighbour (H100, 2026-11-23: the LSE 6.5e-3 off the emulation).
e4m3 to nearest even, saturating at 448 (the GPU's cvt.rn.satfinite.e4m3x2.f32); int8 as
floor(x + 0.5), clamped to +-127 (one formula; the kernel's quantization is compiled without
fused multiply-adds, so x * r + 0.5 is rounded twice there as here).

`GpuArithmetic` switches, one per effect, emulate how the GPU can depart from this exact fp32
arithmetic; `HOPPER` is what an H100 does that the kernel cannot avoid: its 8-bit MMAs keep 13
mantissa bits of the running sum, truncated, after each k32 instruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
P_SHIFT = 8.0  # P is stored as P * 2^P_SHIFT (max 256: exact in e4m3, no saturation)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
AMAX_MIN = 1e-12  # an all-zero row/block/channel gets a tiny scale instead of 0/0


MMA_K = 32  # products per 8-bit wgmma instruction (m64nNk32)
HOPPER_MMA_BITS = 13  # mantissa bits an H100 fp8 wgmma keeps of its running sum, truncated (RZ)


@dataclass(frozen=True)
class GpuArithmetic:
    """Where the GPU's arithmetic may depart from this emulation's, one switch per effect (the
    defaults: none). Sizes at the smoke shapes: benchmark/bench_attention.py --explain."""
    mma_bits: int | None = None  # fp8 MMAs keep this many mantissa bits of the running sum (RZ) after each k32 step
    fp8_rounding: str = "rne"  # fp32 -> e4m3: "rne" (cvt.rn), "rz" (truncation), "fp16" (via fp16: two roundings)
    quotient_ulp: bool = False  # quantization quotients one ulp off (random sign): Triton's `/` = div.full.f32
    exp2_rel: float = 0.0  # relative error of exp2 (uniform in +-exp2_rel): ex2.approx.ftz.f32 is ~2^-22
    p_shift: float = P_SHIFT  # P stored as P * 2^p_shift in e4m3; 0: unscaled, small probabilities go subnormal
    rowsum_rounded_p: bool = False  # the row sum of the rounded P instead of the fp32 P
    seed: int = 0  # of the random switches


EXACT = GpuArithmetic()
HOPPER = GpuArithmetic(mma_bits=HOPPER_MMA_BITS)


def to_fp8(x: torch.Tensor, rounding: str = "rne") -> torch.Tensor:
    """Round fp32 to e4m3, saturating at +-448 as the GPU's cvt.rn.satfinite does; `rounding`
    "rz" or "fp16" only to measure what another conversion would change (GpuArithmetic)."""
    if rounding == "fp16":
        x = x.half().float()
    r = x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if rounding == "rz":  # one code toward zero where nearest rounded away from it (codes are monotonic in |x|)
        away = (r.float().abs() > x.abs()) & (r.float() != 0)
        r = torch.where(away, (r.view(torch.uint8) - 1).view(FP8), r)
    return r


def to_int8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 (already within +-127) to int8: floor(x + 0.5), the kernel's formula."""
    return torch.floor(x + 0.5).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _ulp_noise(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """y one ulp up or down at random (an approximate division's last bit)."""
    up = torch.rand(y.shape, generator=gen, device=y.device) < 0.5
    return torch.nextafter(y, torch.where(up, math.inf, -math.inf))


def reciprocal(x: torch.Tensor, num: float = 1.0) -> torch.Tensor:
    """num / x by one IEEE division, as the kernel's div_rn (torch's `num / x` for a Python number
    is reciprocal-then-multiply: two roundings, an ulp off the kernel's quotient)."""
    return torch.full_like(x, num) / x


def _codes(x: torch.Tensor, amax: torch.Tensor, int8: bool, arith: GpuArithmetic = EXACT,
           gen: torch.Generator | None = None) -> torch.Tensor:
    """x onto the format's grid (e4m3 over +-448, int8 over +-127) as x * (max / amax): the
    reciprocal once per row / block (an IEEE division), then one multiply per element."""
    y = x * reciprocal(amax, INT8_MAX if int8 else FP8_MAX)
    if arith.quotient_ulp:
        y = _ulp_noise(y, gen)
    return to_int8(y) if int8 else to_fp8(y, arith.fp8_rounding)


def _truncate_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (float64) with its mantissa cut to `bits` bits after the leading one, toward zero."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.trunc(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e)


def mma(a: torch.Tensor, b: torch.Tensor, bits: int | None) -> torch.Tensor:
    """a @ b for 8-bit operands held in fp32, summed as an fp8 wgmma does: each MMA_K products
    exactly, added to the running sum, which keeps `bits` mantissa bits (None: fp32 matmul)."""
    if bits is None:
        return a @ b
    a, b = a.double(), b.double()
    acc = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=torch.float64, device=a.device)
    for g in range(0, a.shape[-1], MMA_K):
        acc = _truncate_bits(acc + a[..., g:g + MMA_K] @ b[..., g:g + MMA_K, :], bits)
    return acc.float()


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


def quantize_q(q: torch.Tensor, sm_log2: float, int8: bool = False, arith: GpuArithmetic = EXACT,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, H, d) -> codes (B, H, N, d) and the per-token score scale (B, H, N) = q_scale * sm_log2."""
    qmax = INT8_MAX if int8 else FP8_MAX
    qf = q.float().transpose(1, 2)
    amax = qf.abs().amax(-1).clamp_min(AMAX_MIN)
    return _codes(qf, amax[..., None], int8, arith, gen), amax * (sm_log2 / qmax)


def quantize_k(k: torch.Tensor, mean: torch.Tensor, block_n: int, int8: bool = False, arith: GpuArithmetic = EXACT,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, H, d) minus `mean` -> codes (B, H, Np, d), Np = N padded to block_n with zero rows,
    and one scale per block (B, H, Np / block_n)."""
    b, n, h, d = k.shape
    npad = -(-n // block_n) * block_n
    ks = torch.zeros(b, h, npad, d, device=k.device)
    ks[:, :, :n] = k.float().transpose(1, 2) - mean[:, :, None]
    blocks = ks.view(b, h, npad // block_n, block_n, d)
    amax = blocks.abs().amax((-1, -2)).clamp_min(AMAX_MIN)
    codes = _codes(blocks, amax[..., None, None], int8, arith, gen).view(b, h, npad, d)
    return codes, amax * (1.0 / (INT8_MAX if int8 else FP8_MAX))  # a multiply in the kernel too


def quantize_v(v: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, block_n: int, arith: GpuArithmetic = EXACT,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, N, H, d) -> e4m3 (B, H, d, Np), transposed (Hopper's fp8 MMA wants the PV operand
    k-major) and padded with zero columns to a multiple of block_n. (v - shift) * (1 / scale), the
    reciprocal computed by torch for the kernel too."""
    b, n, h, d = v.shape
    npad = -(-n // block_n) * block_n
    v8 = torch.zeros(b, h, d, npad, dtype=FP8, device=v.device)
    vt = (v.float() - shift[:, None]) * reciprocal(scale)[:, None]  # (B, N, H, d)
    if arith.quotient_ulp:
        vt = _ulp_noise(vt, gen)
    v8[..., :n] = to_fp8(vt, arith.fp8_rounding).permute(0, 2, 3, 1)
    return v8


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 128,
                            fp8_v: bool = True, qk_int8: bool = False,
                            arith: GpuArithmetic = EXACT) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic, step by step, in fp32 on CPU or GPU tensors.

    fp8_v=False: P and V stay in V's dtype (bf16), only Q.K^T is quantized.
    arith: the GPU effects to emulate on top (GpuArithmetic; EXACT: none).
    """
    b, nq, h, d = q.shape
    nk = k.shape[1]
    sm_log2 = score_scale(d)
    gen = torch.Generator(device=q.device).manual_seed(arith.seed)
    q8, rs = quantize_q(q, sm_log2, qk_int8, arith, gen)
    mean = k_mean(k)
    k8, ks = quantize_k(k, mean, block_n, qk_int8, arith, gen)
    qc = torch.einsum("bnhd,bhd->bhn", q.float(), mean) * sm_log2  # the smoothing's share of each score
    if fp8_v:
        shift, vscale = v_shift_scale(v)
        vb = quantize_v(v, shift, vscale, block_n, arith, gen).float().transpose(-1, -2)  # (B, H, Np, d)
        pshift = arith.p_shift
    else:
        vb = torch.zeros(b, h, k8.shape[2], d, device=v.device)
        vb[:, :, :nk] = v.transpose(1, 2).float()
        pshift = 0.0
    qf = q8.float()
    m = torch.full((b, h, nq), -math.inf, device=q.device)
    l = torch.zeros(b, h, nq, device=q.device)
    acc = torch.zeros(b, h, nq, d, device=q.device)
    cols = torch.arange(block_n, device=q.device)
    qk_bits = None if qk_int8 else arith.mma_bits  # int8 MMAs sum exactly in int32
    for j in range(k8.shape[2] // block_n):
        s = mma(qf, k8[:, :, j * block_n:(j + 1) * block_n].float().transpose(-1, -2), qk_bits)  # (B, H, Nq, bn)
        scale = rs * ks[:, :, j, None]
        s = torch.where(j * block_n + cols < nk, s, -math.inf)
        m_new = torch.maximum(m, s.amax(-1) * scale)
        p = torch.exp2(s * scale[..., None] - (m_new - pshift)[..., None])
        if arith.exp2_rel:
            p = p * (1 + arith.exp2_rel * (2 * torch.rand(p.shape, generator=gen, device=p.device) - 1))
        alpha = torch.exp2(m - m_new)
        p_op = to_fp8(p, arith.fp8_rounding).float() if fp8_v else p.to(v.dtype).float()
        l = l * alpha + (p_op if arith.rowsum_rounded_p else p).sum(-1)
        vt = vb[:, :, j * block_n:(j + 1) * block_n]
        acc = acc * alpha[..., None] + (mma(p_op, vt, arith.mma_bits) if fp8_v else p_op @ vt)
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
