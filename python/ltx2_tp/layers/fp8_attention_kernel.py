"""fp8 (e4m3) attention forward for Hopper / Ada in Triton, with the log-sum-exp.

Why: from 32K video tokens on, a step is mostly attention, and cuDNN bf16 SDPA already runs at
the H100's bf16 ceiling (644 TFLOP/s at 32K, anchors.md); e4m3 tensor cores have twice the rate.
The arithmetic is fp8_attention_ref.py's, step for step (its docstring has the scales and why).

Three launches per call, each counted in the measured speed (benchmark/bench_attention.py):
1. `_quant_k`: K minus its per-head mean -> e4m3, one scale per BLOCK_N keys, padded rows zero.
2. `_pack_v`: V -> e4m3 per channel (midrange shift), stored transposed (d, N): Hopper's fp8
   wgmma takes its second operand k-major only, and the PV product contracts over tokens.
   With fp8_v=False, V is only repacked (bf16, padded) so both paths load tiles the same way.
3. `_attn_fwd`: one program per (BLOCK_M queries, batch x head). Q is quantized in its prologue
   (per-token scale: read once per tile, no extra pass), then the online softmax over the K/V
   tiles in fp32 (exp2, 1/sqrt(d) and log2(e) folded into the per-row scale); the last, partial
   tile is the only masked one. With fp8_v, each tile's PV product comes out of the MMA on its own
   and is added to the fp32 accumulator with the rescale (one FFMA, which the rescale needed
   anyway): Hopper's fp8 MMA accumulator keeps ~22 bits (SageAttention2), too few for 5,000 tiles.
The K mean and V range are torch reductions (one read of K and of V each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ltx2_tp.layers.fp8_attention_ref import AMAX_MIN, FP8, FP8_MAX, LN2, P_SHIFT, k_mean, score_scale, v_shift_scale

HEAD_DIMS = (64, 128)  # tl.arange needs a power of two; the video heads are 128, the audio heads 64


# the reference's constants, as Triton reads globals: constexpr
_FP8_MAX = tl.constexpr(FP8_MAX)
_AMAX_MIN = tl.constexpr(AMAX_MIN)
_P_SHIFT = tl.constexpr(P_SHIFT)
_LN2 = tl.constexpr(LN2)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = True  # K/V tiles through TMA descriptors (Hopper); False: pointer loads (cp.async)
    warp_specialize: bool = False

    def describe(self) -> str:
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"
                f"{' tma' if self.tma else ''}{' ws' if self.warp_specialize else ''}")


# Chosen by benchmark/bench_attention.py's sweep on the GPU; LTX2_TP_FP8_ATTN_CONFIG overrides
# ("block_m,block_n,num_warps,num_stages,tma,ws", e.g. "128,64,8,3,1,0").
DEFAULT_CONFIGS = {
    True: KernelConfig(128, 128, 8, 2),   # QK and PV in fp8
    False: KernelConfig(128, 64, 8, 3),   # QK in fp8, PV in bf16 (a 128x128 fp32 score tile + bf16 P spill)
}


def parse_config(text: str) -> KernelConfig:
    v = [int(x) for x in text.split(",")]
    if len(v) != 6:
        raise ValueError(f"LTX2_TP_FP8_ATTN_CONFIG must be 'block_m,block_n,num_warps,num_stages,tma,ws', got {text!r}")
    return KernelConfig(v[0], v[1], v[2], v[3], bool(v[4]), bool(v[5]))


@triton.jit
def _quant_k(K, s_kb, s_kn, s_kh, KC, K8, KS, H, NK, NKP,
             D: tl.constexpr, BLOCK: tl.constexpr):
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
    k8 = tl.clamp(k * _FP8_MAX / amax, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
    tl.store(K8 + (bh.to(tl.int64) * NKP + rn[:, None]) * D + rd[None, :], k8)
    tl.store(KS + bh * (NKP // BLOCK) + j, amax / _FP8_MAX)


@triton.jit
def _pack_v(V, s_vb, s_vn, s_vh, VC, VS, VP, H, NK, NKP,
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
        vf = (v.to(tl.float32) - tl.load(VC + bh * D + rd)[None, :]) / tl.load(VS + bh * D + rd)[None, :]
        v8 = tl.clamp(tl.where(valid, vf, 0.0), -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
        # transposed: element (token n, channel c) of head bh at row bh*D + c, column n
        tl.store(VP + (bh.to(tl.int64) * D + rd[None, :]) * NKP + rn[:, None], v8)
    else:
        tl.store(VP + (bh.to(tl.int64) * NKP + rn[:, None]) * D + rd[None, :], v)


@triton.jit
def _tile(acc, l_i, m_i, q8, rs, K8, KS, VP, bh, j, NK, NKP,
          D: tl.constexpr, BLOCK_N: tl.constexpr, FP8_V: tl.constexpr, TMA: tl.constexpr,
          MASK: tl.constexpr):
    """One K/V tile of the online softmax. Scores in log2 units; P shifted by 2^_P_SHIFT for e4m3."""
    start = j * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, D)
    if TMA:
        k = K8.load([bh * NKP + start, 0])
    else:
        k = tl.load(K8 + (bh.to(tl.int64) * NKP + start + rn[:, None]) * D + rd[None, :])
    s = tl.dot(q8, k.T)
    scale = rs * tl.load(KS + bh * (NKP // BLOCK_N) + j)  # per-row Q scale x this tile's K scale
    if MASK:
        s = tl.where((start + rn)[None, :] < NK, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)  # scale > 0: max commutes with it
    if FP8_V:
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
        pv = tl.dot(tl.clamp(p, 0.0, _FP8_MAX).to(tl.float8e4nv), vt.T)
        acc = acc * alpha[:, None] + pv  # fp32 add outside the MMA (see the module docstring)
    else:
        if TMA:
            v = VP.load([bh * NKP + start, 0])
        else:
            v = tl.load(VP + (bh.to(tl.int64) * NKP + start + rn[:, None]) * D + rd[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, s_qb, s_qn, s_qh, K8, KS, KC, VP, VS, VC, O, s_ob, s_on, s_oh, LSE,
              H, NQ, NK, NKP, sm_log2,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8_V: tl.constexpr,
              TMA: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    row_ok = rm < NQ
    q = tl.load(Q + b.to(tl.int64) * s_qb + h * s_qh + rm[:, None].to(tl.int64) * s_qn + rd[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    # Q quantized here, one scale per token: the tile is read once per program anyway
    amax = tl.maximum(tl.max(tl.abs(q), 1), _AMAX_MIN)
    q8 = tl.clamp(q * _FP8_MAX / amax[:, None], -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
    rs = amax * (sm_log2 / _FP8_MAX)
    qc = tl.sum(q * tl.load(KC + bh * D + rd)[None, :], 1) * sm_log2  # q.mean(K): the LSE's share

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = NK // BLOCK_N
    for j in tl.range(0, n_full, warp_specialize=WS):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q8, rs, K8, KS, VP, bh, j, NK, NKP, D, BLOCK_N, FP8_V, TMA, False)
    if n_full * BLOCK_N < NK:
        acc, l_i, m_i = _tile(acc, l_i, m_i, q8, rs, K8, KS, VP, bh, n_full, NK, NKP, D, BLOCK_N, FP8_V, TMA, True)

    out = acc / l_i[:, None]
    if FP8_V:
        out = out * tl.load(VS + bh * D + rd)[None, :] + tl.load(VC + bh * D + rd)[None, :]
        lse2 = m_i - _P_SHIFT + tl.math.log2(l_i) + qc
    else:
        lse2 = m_i + tl.math.log2(l_i) + qc
    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + rm[:, None].to(tl.int64) * s_on + rd[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * NQ + rm, lse2 * _LN2, mask=row_ok)


def _descriptors(k8, vp, d: int, fp8_v: bool, cfg: KernelConfig):
    if not cfg.tma:
        return k8, vp
    from triton.tools.tensor_descriptor import TensorDescriptor

    bn = cfg.block_n
    return (TensorDescriptor.from_tensor(k8, [bn, d]),
            TensorDescriptor.from_tensor(vp, [d, bn] if fp8_v else [bn, d]))


def _kernel_args(q, out, lse, k8, ks, kc, vp, vs, vc, nk: int, nkp: int, fp8_v: bool, cfg: KernelConfig):
    d = q.shape[-1]
    k8, vp = _descriptors(k8, vp, d, fp8_v, cfg)
    return dict(Q=q, s_qb=q.stride(0), s_qn=q.stride(1), s_qh=q.stride(2), K8=k8, KS=ks, KC=kc, VP=vp, VS=vs,
                VC=vc, O=out, s_ob=out.stride(0), s_on=out.stride(1), s_oh=out.stride(2), LSE=lse,
                H=q.shape[2], NQ=q.shape[1], NK=nk, NKP=nkp, sm_log2=score_scale(d),
                D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, FP8_V=fp8_v, TMA=cfg.tma, WS=cfg.warp_specialize,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, fp8_v: bool, block_n: int):
    """K -> (k8 (B*H*Np, d), per-block scales, mean); V -> packed buffer with its shift and scale."""
    b, nk, h, d = k.shape
    nkp = -(-nk // block_n) * block_n
    dev = k.device
    kc = k_mean(k).contiguous()
    k8 = torch.empty(b * h * nkp, d, dtype=FP8, device=dev)
    ks = torch.empty(b * h, nkp // block_n, dtype=torch.float32, device=dev)
    warps = 8 if d * block_n >= 128 * 128 else 4
    _quant_k[(nkp // block_n, b * h)](k, k.stride(0), k.stride(1), k.stride(2), kc, k8, ks, h, nk, nkp,
                                      D=d, BLOCK=block_n, num_warps=warps)
    if fp8_v:
        vc, vs = (t.contiguous() for t in v_shift_scale(v))
        vp = torch.empty(b * h * d, nkp, dtype=FP8, device=dev)
    else:
        vc = vs = kc  # not read
        vp = torch.empty(b * h * nkp, d, dtype=v.dtype, device=dev)
    _pack_v[(nkp // block_n, b * h)](v, v.stride(0), v.stride(1), v.stride(2), vc, vs, vp, h, nk, nkp,
                                     D=d, BLOCK=block_n, FP8_V=fp8_v, num_warps=warps)
    return k8, ks, kc, vp, vs, vc, nkp


def fp8_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8_v: bool = True,
                      cfg: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Nq, H, d) x (B, Nk, H, d) -> out (B, Nq, H, d) in q's dtype, lse (B, H, Nq) fp32."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"fp8 attention: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = cfg or DEFAULT_CONFIGS[fp8_v]
    b, nq, h, d = q.shape
    k8, ks, kc, vp, vs, vc, nkp = quantize_kv(k, v, fp8_v, cfg.block_n)
    out = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if cfg.tma:
        _set_allocator()
    grid = (triton.cdiv(nq, cfg.block_m), b * h)
    _attn_fwd[grid](**_kernel_args(q, out, lse, k8, ks, kc, vp, vs, vc, k.shape[1], nkp, fp8_v, cfg))
    return out, lse


_ALLOCATOR_SET = False


def _set_allocator() -> None:
    """Scratch for kernels that build TMA descriptors on the device (warp-specialized loops may)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET and hasattr(triton, "set_allocator"):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def compile_for(cfg: KernelConfig, fp8_v: bool, head_dim: int = 128, nq: int = 124_440, nk: int = 124_440,
                heads: int = 32, arch: int = 90):
    """Compile `_attn_fwd` for an sm_`arch` GPU on a machine without one (Triton ships ptxas),
    specialized as a launch at these sizes would be: to check that a config lowers (fp8 wgmma,
    registers, no spills) before GPU time is spent on it. Uses Triton internals (3.6)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    d, bn = head_dim, cfg.block_n
    nkp = -(-nk // bn) * bn
    # small stand-ins with the real strides' divisibility: only types, alignment and ints matter
    q = torch.zeros(1, 1, heads, d, dtype=torch.bfloat16)
    k8 = torch.zeros(2 * bn, d, dtype=FP8)
    vp = torch.zeros(d, 2 * bn, dtype=FP8) if fp8_v else torch.zeros(2 * bn, d, dtype=torch.bfloat16)
    f = torch.zeros(4 * d, dtype=torch.float32)
    args = _kernel_args(q, q, f, k8, f, f, vp, f, f, nk, nkp, fp8_v, cfg)
    args.update(NQ=nq, s_qb=nq * heads * d, s_ob=nq * heads * d)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = _attn_fwd
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, debug=False, instrumentation_mode="")
    call = {k: v for k, v in args.items() if k not in ("num_warps", "num_stages")}
    bound, spec, opts = binder(**call, **kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__)
