"""Quantized attention forward for Hopper / Ada in Triton, with the log-sum-exp: Q.K^T in e4m3
or int8, P.V in e4m3 or in V's dtype.

Why: from 32K video tokens on, a step is mostly attention, and cuDNN bf16 SDPA already runs at
the H100's bf16 ceiling (644 TFLOP/s at 32K, anchors.md); 8-bit tensor cores have twice the rate.
The arithmetic is fp8_attention_ref.py's, step for step (its docstring has the scales and why).

Four launches per call, all counted in the measured speed (benchmark/bench_attention.py):
1. `_quant_q`: Q -> 8-bit codes (B*H*Nq', d), one scale per token (with 1/sqrt(d) and log2(e)
   folded in), and q.mean(K) for the LSE. A separate pass (267 MB read at 32K tokens) so that the
   attention kernel's Q tile stays in shared memory as the MMA's A operand: quantized in the
   kernel's prologue it lived in registers and was re-read from shared memory every tile.
2. `_quant_k`: K minus its per-head mean (torch, one read) -> codes, one scale per BLOCK_N keys.
3. `_pack_v`: V minus its channel means -> e4m3 per channel (torch mean + aminmax), stored
   transposed (d, N): Hopper's 8-bit wgmma takes its B operand k-major only, and P.V contracts
   over tokens. With fp8_v=False V is only repacked (padded), so both paths load tiles alike.
4. `_attn_fwd`: one program per (BLOCK_M queries, batch x head): online softmax over the K/V
   tiles in fp32 with exp2; only the last, partial tile is masked. int8 scores leave the MMA as
   int32 and become fp32 by an integer add and an fp32 subtract (exact below 2^22 = 4.2M >
   128 x 127 x 127), not I2F, a quarter-rate conversion like exp2's MUFU. With fp8_v each tile's
   P.V product leaves the MMA on its own and is added to the fp32 accumulator with the rescale
   (one FFMA, which the rescale needed anyway): Hopper's fp8 MMA accumulates with ~14 mantissa
   bits (SageAttention2's "FP22", DeepSeek-V3), too few to carry a sum over 2,885 tiles of 128
   keys (369K keys); SASS-checked: the add stays outside the MMA.
Buffers are padded (Q to BLOCK_M rows, K/V to BLOCK_N) so tiles never straddle a (batch, head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ltx2_tp.layers.fp8_attention_ref import (AMAX_MIN, FP8, FP8_MAX, INT8_MAX, LN2, P_SHIFT, k_mean, reciprocal,
                                              score_scale, v_shift_scale)

HEAD_DIMS = (64, 128)  # tl.arange needs a power of two; the video heads are 128, the audio heads 64

# the reference's constants, as Triton reads globals: constexpr
_FP8_MAX = tl.constexpr(FP8_MAX)
_INT8_MAX = tl.constexpr(INT8_MAX)
_AMAX_MIN = tl.constexpr(AMAX_MIN)
_P_SHIFT = tl.constexpr(P_SHIFT)
_LN2 = tl.constexpr(LN2)
_I2F_BITS = tl.constexpr(0x4B400000)  # bits of 1.5 * 2^23: (x + bits) read as fp32 is 1.5 * 2^23 + x
_I2F_OFFSET = tl.constexpr(12582912.0)


# the quantization launches round every multiply and add on its own, as the emulation's torch ops
# do (a fused x * r + 0.5 would round once): their codes are then bit-identical to it
QUANT_OPTS = {"enable_fp_fusion": False}


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = True  # tiles through TMA descriptors (Hopper); False: pointer loads (cp.async)
    maxnreg: int | None = None  # registers per thread: 168 fits 3 CTAs of 4 warps on an SM (65,536)

    def describe(self) -> str:
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}{' tma' if self.tma else ''}"
                f"{f' r{self.maxnreg}' if self.maxnreg else ''}")


# (qk_int8, fp8_v) -> config; chosen by benchmark/bench_attention.py's sweep on an H100, which
# prints the best of each. LTX2_TP_FP8_ATTN_CONFIG="block_m,block_n,num_warps,num_stages,tma[,maxnreg]"
# overrides all of them (fp8_attention.py).
# Until measured: 64-row tiles with 4 warps, 3 CTAs per SM (registers <= 168, shared <= 74 KB),
# so that one CTA's softmax runs while another's MMAs do (Triton 3.6 does not overlap them within
# a CTA on Hopper: each wgmma is waited for right after it is issued; sm_90 compilation, offline).
DEFAULT_CONFIGS = {
    (False, True): KernelConfig(64, 128, 4, 2, True, 168),
    (True, True): KernelConfig(64, 128, 4, 2, True, 168),
    (False, False): KernelConfig(64, 64, 4, 2),
    (True, False): KernelConfig(64, 64, 4, 2),
}


def parse_config(text: str) -> KernelConfig:
    """'block_m,block_n,num_warps,num_stages,tma[,maxnreg]', as bench_attention.py prints it."""
    v = [int(x) for x in text.split(",")]
    if len(v) not in (5, 6) or v[0] not in (64, 128) or v[1] not in (32, 64, 128) or v[2] not in (4, 8):
        raise ValueError("LTX2_TP_FP8_ATTN_CONFIG must be 'block_m,block_n,num_warps,num_stages,tma[,maxnreg]' with "
                         f"block_m in (64, 128), block_n in (32, 64, 128), num_warps in (4, 8), got {text!r}")
    return KernelConfig(v[0], v[1], v[2], v[3], bool(v[4]), v[5] if len(v) == 6 and v[5] else None)


@triton.jit
def _to_codes(x, amax, INT8: tl.constexpr):
    """x onto the grid as x * (max / amax), the reciprocal by an IEEE division (div_rn; `/` would be
    div.full.f32, whose last bit flips exact ties: fp8_attention_ref.py): int8 over +-127 as
    floor(x + 0.5), or e4m3 over +-448 (RNE, saturating). The quantization kernels are compiled
    without FMA fusion (QUANT_OPTS), so each operation rounds as torch's does."""
    if INT8:
        r = tl.math.div_rn(tl.zeros_like(amax) + _INT8_MAX, amax)
        return tl.clamp(tl.floor(x * r + 0.5), -_INT8_MAX, _INT8_MAX).to(tl.int8)
    else:
        r = tl.math.div_rn(tl.zeros_like(amax) + _FP8_MAX, amax)
        return tl.clamp(x * r, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)


@triton.jit(do_not_specialize=["NQ"])  # token counts: one compilation for every length
def _quant_q(Q, s_qb, s_qn, s_qh, KC, Q8, QS, QC, H, NQ, NQP, rs_mult, sm_log2,
             D: tl.constexpr, BLOCK: tl.constexpr, INT8: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rm = j * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, D)
    ptrs = Q + b.to(tl.int64) * s_qb + h * s_qh + rm[:, None].to(tl.int64) * s_qn + rd[None, :]
    q = tl.load(ptrs, mask=rm[:, None] < NQ, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(q), 1), _AMAX_MIN)
    tl.store(Q8 + (bh.to(tl.int64) * NQP + rm[:, None]) * D + rd[None, :], _to_codes(q, amax[:, None], INT8))
    tl.store(QS + bh.to(tl.int64) * NQP + rm, amax * rs_mult)  # per-row score scale, log2 units
    tl.store(QC + bh.to(tl.int64) * NQP + rm, tl.sum(q * tl.load(KC + bh * D + rd)[None, :], 1) * sm_log2)


@triton.jit(do_not_specialize=["NK"])  # token counts: one compilation for every length
def _quant_k(K, s_kb, s_kn, s_kh, KC, K8, KS, H, NK, NKP,
             D: tl.constexpr, BLOCK: tl.constexpr, INT8: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rn = j * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, D)
    valid = rn[:, None] < NK
    ptrs = K + b.to(tl.int64) * s_kb + h * s_kh + rn[:, None].to(tl.int64) * s_kn + rd[None, :]
    k = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    k = tl.where(valid, k - tl.load(KC + bh * D + rd)[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), _AMAX_MIN)
    tl.store(K8 + (bh.to(tl.int64) * NKP + rn[:, None]) * D + rd[None, :], _to_codes(k, amax, INT8))
    if INT8:
        tl.store(KS + bh * (NKP // BLOCK) + j, amax * (1.0 / _INT8_MAX))  # a multiply, as the emulation's
    else:
        tl.store(KS + bh * (NKP // BLOCK) + j, amax * (1.0 / _FP8_MAX))


@triton.jit(do_not_specialize=["NK"])  # token counts: one compilation for every length
def _pack_v(V, s_vb, s_vn, s_vh, VC, VI, VP, H, NK, NKP,
            D: tl.constexpr, BLOCK: tl.constexpr, FP8_V: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rn = j * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, D)
    valid = rn[:, None] < NK
    ptrs = V + b.to(tl.int64) * s_vb + h * s_vh + rn[:, None].to(tl.int64) * s_vn + rd[None, :]
    v = tl.load(ptrs, mask=valid, other=0.0)
    if FP8_V:
        vf = (v.to(tl.float32) - tl.load(VC + bh * D + rd)[None, :]) * tl.load(VI + bh * D + rd)[None, :]
        v8 = tl.clamp(tl.where(valid, vf, 0.0), -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
        # transposed: (token n, channel c) of head bh at row bh * D + c, column n
        tl.store(VP + (bh.to(tl.int64) * D + rd[None, :]) * NKP + rn[:, None], v8)
    else:
        tl.store(VP + (bh.to(tl.int64) * NKP + rn[:, None]) * D + rd[None, :], v)


@triton.jit
def _tile(acc, l_i, m_i, q, rs, K8, KS, VP, bh, j, NK, NKP,
          D: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, FP8_V: tl.constexpr,
          TMA: tl.constexpr, MASK: tl.constexpr):
    """One K/V tile of the online softmax; scores in log2 units."""
    start = j * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, D)
    if TMA:
        k = K8.load([bh * NKP + start, 0])
    else:
        k = tl.load(K8 + (bh.to(tl.int64) * NKP + start + rn[:, None]) * D + rd[None, :])
    if QK_INT8:
        s = (tl.dot(q, k.T) + _I2F_BITS).to(tl.float32, bitcast=True) - _I2F_OFFSET
    else:
        s = tl.dot(q, k.T)
    scale = rs * tl.load(KS + bh * (NKP // BLOCK_N) + j)  # per-row Q scale x this tile's K scale
    if MASK:
        s = tl.where((start + rn)[None, :] < NK, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)  # scale > 0: max commutes with it
    if FP8_V:  # P * 2^8 in e4m3 (fp8_attention_ref.P_SHIFT)
        p = tl.math.exp2(s * scale[:, None] - (m_new - _P_SHIFT)[:, None])
    else:
        p = tl.math.exp2(s * scale[:, None] - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP8_V:
        if TMA:
            vt = VP.load([bh * D, start])
        else:
            vt = tl.load(VP + (bh.to(tl.int64) * D + rd[:, None]) * NKP + start + rn[None, :])
        pv = tl.dot(p.to(tl.float8e4nv), vt.T)  # p <= 2^8 (+ rounding): no clamp needed
        acc = acc * alpha[:, None] + pv  # fp32 add outside the MMA (module docstring)
    else:
        if TMA:
            v = VP.load([bh * NKP + start, 0])
        else:
            v = tl.load(VP + (bh.to(tl.int64) * NKP + start + rn[:, None]) * D + rd[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["NQ", "NK"])  # token counts: one compilation for every length
def _attn_fwd(Q8, QS, QC, K8, KS, VP, VS, VC, O, s_ob, s_on, s_oh, LSE, H, NQ, NQP, NK, NKP,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
              FP8_V: tl.constexpr, TMA: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)  # programs of one head run together: its K/V tiles stay in L2
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    q_row = bh * NQP + pid_m * BLOCK_M
    if TMA:
        q = Q8.load([q_row, 0])
    else:
        q = tl.load(Q8 + (q_row + tl.arange(0, BLOCK_M))[:, None].to(tl.int64) * D + rd[None, :])
    rs = tl.load(QS + bh.to(tl.int64) * NQP + rm)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = NK // BLOCK_N
    for j in tl.range(0, n_full):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, rs, K8, KS, VP, bh, j, NK, NKP,
                              D, BLOCK_N, QK_INT8, FP8_V, TMA, False)
    if n_full * BLOCK_N < NK:
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, rs, K8, KS, VP, bh, n_full, NK, NKP,
                              D, BLOCK_N, QK_INT8, FP8_V, TMA, True)

    out = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i) + tl.load(QC + bh.to(tl.int64) * NQP + rm)
    if FP8_V:
        out = out * tl.load(VS + bh * D + rd)[None, :] + tl.load(VC + bh * D + rd)[None, :]
        lse2 = lse2 - _P_SHIFT
    row_ok = rm < NQ
    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + rm[:, None].to(tl.int64) * s_on + rd[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * NQ + rm, lse2 * _LN2, mask=row_ok)


def quantize_qkv(q, k, v, qk_int8: bool, fp8_v: bool, cfg: KernelConfig) -> dict:
    """The three quantization launches (and two torch reductions): the attention kernel's inputs."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    bm, bn = cfg.block_m, cfg.block_n
    nqp, nkp = -(-nq // bm) * bm, -(-nk // bn) * bn
    dev, code = q.device, torch.int8 if qk_int8 else FP8
    qmax = INT8_MAX if qk_int8 else FP8_MAX
    kc = k_mean(k).contiguous()
    q8 = torch.empty(b * h * nqp, d, dtype=code, device=dev)
    qs, qc = (torch.empty(b * h * nqp, dtype=torch.float32, device=dev) for _ in range(2))
    warps = 8 if d * max(bm, bn) >= 128 * 128 else 4
    _quant_q[(nqp // bm, b * h)](q, q.stride(0), q.stride(1), q.stride(2), kc, q8, qs, qc, h, nq, nqp,
                                 score_scale(d) / qmax, score_scale(d), D=d, BLOCK=bm, INT8=qk_int8, num_warps=warps,
                                 **QUANT_OPTS)
    k8 = torch.empty(b * h * nkp, d, dtype=code, device=dev)
    ks = torch.empty(b * h, nkp // bn, dtype=torch.float32, device=dev)
    _quant_k[(nkp // bn, b * h)](k, k.stride(0), k.stride(1), k.stride(2), kc, k8, ks, h, nk, nkp,
                                 D=d, BLOCK=bn, INT8=qk_int8, num_warps=warps, **QUANT_OPTS)
    if fp8_v:
        vc, vs = (t.contiguous() for t in v_shift_scale(v))
        vi = reciprocal(vs)  # as fp8_attention_ref.quantize_v
        vp = torch.empty(b * h * d, nkp, dtype=FP8, device=dev)
    else:
        vc = vs = vi = kc  # not read
        vp = torch.empty(b * h * nkp, d, dtype=v.dtype, device=dev)
    _pack_v[(nkp // bn, b * h)](v, v.stride(0), v.stride(1), v.stride(2), vc, vi, vp, h, nk, nkp,
                                D=d, BLOCK=bn, FP8_V=fp8_v, num_warps=warps, **QUANT_OPTS)
    return dict(Q8=q8, QS=qs, QC=qc, K8=k8, KS=ks, VP=vp, VS=vs, VC=vc, NQP=nqp, NKP=nkp)


def _kernel_args(bufs: dict, out, lse, nk: int, qk_int8: bool, fp8_v: bool, cfg: KernelConfig) -> dict:
    b, nq, h, d = out.shape
    bm, bn = cfg.block_m, cfg.block_n
    q8, k8, vp = bufs["Q8"], bufs["K8"], bufs["VP"]
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        q8 = TensorDescriptor.from_tensor(q8, [bm, d])
        k8 = TensorDescriptor.from_tensor(k8, [bn, d])
        vp = TensorDescriptor.from_tensor(vp, [d, bn] if fp8_v else [bn, d])
    return dict(bufs, Q8=q8, K8=k8, VP=vp, O=out, s_ob=out.stride(0), s_on=out.stride(1), s_oh=out.stride(2),
                LSE=lse, H=h, NQ=nq, NK=nk, D=d, BLOCK_M=bm, BLOCK_N=bn, QK_INT8=qk_int8, FP8_V=fp8_v,
                TMA=cfg.tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_int8: bool = False, fp8_v: bool = True,
                  cfg: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Nq, H, d) x (B, Nk, H, d) -> out (B, Nq, H, d) in q's dtype, lse (B, H, Nq) fp32."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"quantized attention: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    cfg = cfg or DEFAULT_CONFIGS[(qk_int8, fp8_v)]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bufs = quantize_qkv(q, k, v, qk_int8, fp8_v, cfg)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    grid = (bufs["NQP"] // cfg.block_m, q.shape[0] * q.shape[2])
    global last_kernel
    last_kernel = _attn_fwd[grid](**_kernel_args(bufs, out, lse, k.shape[1], qk_int8, fp8_v, cfg))
    return out, lse


last_kernel = None  # the last launch's compiled kernel: n_regs, n_spills, metadata.shared (benchmarks)


def _compile(fn, args: dict, opts: dict, arch: int):
    """Compile a Triton kernel for an sm_`arch` GPU on a machine without one (Triton ships ptxas),
    bound to `args` as a launch would be. Uses Triton 3.6 internals."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    opts = dict(opts, debug=False, instrumentation_mode="")
    bound, spec, options = binder(**args, **opts)
    options, sig, consts, attrs = fn._pack_args(backend, opts, bound, spec, options)
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__)


def compile_for(cfg: KernelConfig, qk_int8: bool, fp8_v: bool, head_dim: int = 128, nq: int = 124_440,
                nk: int = 124_440, heads: int = 32, arch: int = 90):
    """Compile `_attn_fwd` for sm_`arch`, specialized as a launch at these sizes would be: checks
    that a config lowers (8-bit wgmma, registers, no spills) before GPU time is spent on it."""
    d, bm, bn = head_dim, cfg.block_m, cfg.block_n
    code = torch.int8 if qk_int8 else FP8
    f = torch.zeros(4 * max(bm, bn, d), dtype=torch.float32)
    bufs = dict(Q8=torch.zeros(2 * bm, d, dtype=code), QS=f, QC=f, K8=torch.zeros(2 * bn, d, dtype=code), KS=f,
                VP=torch.zeros(d, 2 * bn, dtype=FP8) if fp8_v else torch.zeros(2 * bn, d, dtype=torch.bfloat16),
                VS=f, VC=f, NQP=-(-nq // bm) * bm, NKP=-(-nk // bn) * bn)
    out = torch.zeros(1, 1, heads, d, dtype=torch.bfloat16)
    args = _kernel_args(bufs, out, f, nk, qk_int8, fp8_v, cfg)
    args.update(NQ=nq, s_ob=nq * heads * d)  # the ints a real launch specializes on
    opts = dict(num_warps=args.pop("num_warps"), num_stages=args.pop("num_stages"),
                **({"maxnreg": args.pop("maxnreg")} if "maxnreg" in args else {}))
    return _compile(_attn_fwd, args, opts, arch)


def compile_quantization_for(qk_int8: bool, fp8_v: bool, head_dim: int = 128, block: int = 64, heads: int = 32,
                             arch: int = 90) -> list:
    """Compile the three quantization kernels for sm_`arch` as quantize_qkv launches them."""
    d = head_dim
    x = torch.zeros(1, 2 * block, heads, d, dtype=torch.bfloat16)
    f = torch.zeros(heads * d, dtype=torch.float32)
    code = torch.zeros(2 * block, d, dtype=torch.int8 if qk_int8 else FP8)
    strides = dict(zip(("b", "n", "h"), x.stride()[:3]))
    opts = dict(num_warps=4, **QUANT_OPTS)
    return [_compile(_quant_q, dict(Q=x, s_qb=strides["b"], s_qn=strides["n"], s_qh=strides["h"], KC=f, Q8=code, QS=f,
                                    QC=f, H=heads, NQ=1000, NQP=1024, rs_mult=0.1, sm_log2=0.1, D=d, BLOCK=block,
                                    INT8=qk_int8), opts, arch),
            _compile(_quant_k, dict(K=x, s_kb=strides["b"], s_kn=strides["n"], s_kh=strides["h"], KC=f, K8=code, KS=f,
                                    H=heads, NK=1000, NKP=1024, D=d, BLOCK=block, INT8=qk_int8), opts, arch),
            _compile(_pack_v, dict(V=x, s_vb=strides["b"], s_vn=strides["n"], s_vh=strides["h"], VC=f, VI=f,
                                   VP=torch.zeros(d, 2 * block, dtype=FP8) if fp8_v else x, H=heads, NK=1000, NKP=1024,
                                   D=d, BLOCK=block, FP8_V=fp8_v), opts, arch)]
