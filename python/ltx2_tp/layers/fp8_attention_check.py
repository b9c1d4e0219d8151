"""When is a quantized attention kernel right? The smoke test's criterion (benchmark/bench_attention.py),
with each tolerance derived from a step of the format or of the GPU's arithmetic, so that a correct
kernel passes and an indexing, masking or scale bug fails.

The kernel's codes equal the emulation's bit for bit (fp8_attention_ref.py, "Rounding"); what it
cannot share with the emulation is the H100's 8-bit MMA, which keeps 13 mantissa bits of its
running sum, truncated, after each k32 step (fp8_attention_ref.HOPPER). Three checks on one call:

1. LSE against the emulation: |d lse| <= ln2 * 2 * (d / 32) * 2^-13 * max_j sum_c |q8_c k8_jc| * scale_j
   + 1e-4. The LSE moves at most as far as the row's largest score moves; each of the d/32 steps
   truncates a partial sum that is at most the sum of |products| by less than 2^-13 of it; x2 for
   the products' alignment inside a step; 1e-4 for fp32 sums, ex2.approx and lg2. Int8 scores sum
   exactly in int32: 1e-4 alone. (A key of the padding counted: +log(1 + 1/Nk) per key, 1e-3 for
   one key in 1,000; a K scale 1% off: ~1e-2.)
2. The output against the emulation: rel. RMS <= 3 x that of the HOPPER emulation against the
   exact one, + 2^-9 (the bf16 output's half step). The truncation moves scores by ~1e-4, but P
   is then rounded to e4m3, and the few P that sit near a rounding boundary jump a whole step
   (2^-3 of themselves): on normal data the HOPPER emulation is 4e-3 (fp8) / 2e-3 (fp8_qk) / 7e-4
   (int8_fp8) off the exact one, the first GPU run 5.8e-3 / 2.3e-3 / 2.7e-3 with the quotient
   ulps of the old quantization on top (fp8_attention_ref.GpuArithmetic.quotient_ulp).
3. The output against fp32 attention: rel. RMS <= 1.5 x `predicted_error` + check 2's tolerance:
   the format's own error to first order from its rounding steps (Q, K, P, V, the bf16 output),
   computed without the emulation, so that a mistake the emulation shares is caught too.
"""

from __future__ import annotations

import math

import torch

from ltx2_tp.layers.fp8_attention_ref import (EXACT, FP8_MAX, HOPPER, HOPPER_MMA_BITS, INT8_MAX, LN2, MMA_K,
                                              fp8_attention_reference, k_mean, quantize_k, quantize_q,
                                              reciprocal, score_scale, v_shift_scale)

LSE_FLOOR = 1e-4  # fp32 sums, ex2.approx, lg2 (relative ~1e-6 of the row sum)
OUT_FLOOR = 2.0 ** -9  # the bf16 output's half step, relative
MODEL_FACTOR = 3.0  # the HOPPER emulation simplifies the MMA (exact sums inside a k32 step)
PREDICTED_FACTOR = 1.5  # first-order error estimate vs the emulation's measured error: 0.95-1.02 (test_fp8_attention.py)
HOPPER_DEV_MAX = 5e-3  # the HOPPER emulation's largest deviation from the exact one seen (fp8, qknorm data: 4.6e-3)


def rel_errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative max and RMS error of out against ref, both over the whole tensor."""
    a, b = out.float(), ref.float()
    diff = a - b
    return {"rel_max": float(diff.abs().max() / b.abs().max().clamp_min(1e-30)),
            "rel_rms": float(diff.pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))}


def fp32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
    """Exact attention in fp32, one head at a time, for the query rows `rows` (all: None):
    out (B, r, H, d), lse (B, H, r)."""
    qs = q.float() if rows is None else q[:, rows].float()
    outs, lses = [], []
    for h in range(q.shape[2]):
        s = qs[:, :, h] @ k[:, :, h].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        lses.append(s.logsumexp(-1))
        outs.append(torch.softmax(s, -1) @ v[:, :, h].float())
        del s
    return torch.stack(outs, 2), torch.stack(lses, 1)


def _fp_ulp(y: torch.Tensor, mant_bits: int, min_exp: int) -> torch.Tensor:
    """The grid step at |y| of a float format with `mant_bits` mantissa bits whose smallest normal
    exponent is min_exp (subnormals below it share its step)."""
    e = torch.floor(torch.log2(y.abs().clamp_min(2.0 ** (min_exp - 1))))
    return torch.exp2(torch.clamp(e, min=min_exp) - mant_bits)


def _e4m3_ulp(y: torch.Tensor) -> torch.Tensor:
    return _fp_ulp(y, 3, -6)


def _bf16_ulp(y: torch.Tensor) -> torch.Tensor:
    return _fp_ulp(y, 7, -126)


def _rounding_var(y: torch.Tensor, int8: bool) -> torch.Tensor:
    """Variance of rounding y (in code units) onto the int8 or e4m3 grid: step^2 / 12."""
    return torch.full_like(y, 1 / 12) if int8 else _e4m3_ulp(y) ** 2 / 12


def predicted_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, fp8_v: bool, qk_int8: bool,
                    rows: torch.Tensor | None = None, key_chunk: int = 2048) -> float:
    """The format's relative RMS error against exact attention, to first order in its rounding
    steps, each rounding an independent error of variance step^2 / 12 (on the query rows `rows`).

    Per output element o_ic = sum_j pi_ij v_jc: K's rounding moves score j by sum_c q_c dk_jc / sqrt(d),
    independently per key; Q's moves all scores of a row together, so only through the covariance
    of V and K under pi; P's (e4m3 or bf16) and V's (e4m3) add their own; the bf16 output its half step.
    """
    b, nq, h, d = q.shape
    qmax = INT8_MAX if qk_int8 else FP8_MAX
    qf = (q if rows is None else q[:, rows]).float()
    amax_q = qf.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    var_q = _rounding_var(qf * reciprocal(amax_q, qmax), qk_int8) * (amax_q / qmax) ** 2  # (B, r, H, d)
    kc = k.float() - k_mean(k)[:, None]  # centered, as quantized
    _, ks = quantize_k(k, k_mean(k), block_n, qk_int8)  # (B, H, Nb) code -> value
    kscale = ks.repeat_interleave(block_n, -1)[..., :k.shape[1]].transpose(1, 2)[..., None]  # (B, Nk, H, 1)
    var_k = _rounding_var(kc / kscale, qk_int8) * kscale ** 2
    vf = v.float()
    if fp8_v:
        shift, vscale = v_shift_scale(v)
        var_v = _rounding_var((vf - shift[:, None]) / vscale[:, None], False) * vscale[:, None] ** 2
    total, norm = 0.0, 0.0
    for bi in range(b):
        for hi in range(h):
            qq, kk, vv, kcc = qf[bi, :, hi], k[bi, :, hi].float(), vf[bi, :, hi], kc[bi, :, hi]
            s = qq @ kk.T / math.sqrt(d)
            pi = torch.softmax(s, -1)
            o = pi @ vv

            def spread(w):  # sum_j w_ij (v_jc - o_ic)^2
                return w @ vv ** 2 - 2 * o * (w @ vv) + o ** 2 * w.sum(-1, keepdim=True)

            e = spread(pi ** 2 * ((qq ** 2) @ var_k[bi, :, hi].T) / d)  # K
            cov = -o[:, :, None] * (pi @ kcc)[:, None, :]  # sum_j pi_j (v_jc - o_c) kc_je, keys in chunks
            for j0 in range(0, kk.shape[0], key_chunk):
                vk = vv[j0:j0 + key_chunk, :, None] * kcc[j0:j0 + key_chunk, None, :]
                cov += (pi[:, j0:j0 + key_chunk] @ vk.flatten(1)).view(cov.shape)
            e = e + (cov ** 2 * var_q[bi, :, hi, None, :]).sum(-1) / d  # Q
            p = torch.exp(s - s.amax(-1, keepdim=True))
            if fp8_v:  # P * 2^8 onto e4m3, V onto e4m3
                var_p = _e4m3_ulp(p * 2 ** 8) ** 2 / 12 / 2 ** 16
                e = e + pi ** 2 @ var_v[bi, :, hi]
            else:
                var_p = _bf16_ulp(p) ** 2 / 12
            e = e + spread(var_p / p.sum(-1, keepdim=True) ** 2)  # P
            e = e + _bf16_ulp(o) ** 2 / 12  # the output's rounding
            total += float(e.sum())
            norm += float((o ** 2).sum())
    return math.sqrt(total / max(norm, 1e-30))


def score_bound(q: torch.Tensor, k: torch.Tensor, block_n: int, qk_int8: bool) -> torch.Tensor:
    """Per query row (B, H, Nq), in log2 units: how far the 8-bit MMA's truncated running sum can
    move any of the row's scores (check 1). Zero for int8 (exact int32 sums)."""
    b, nq, h, d = q.shape
    if qk_int8:
        return torch.zeros(b, h, nq, device=q.device)
    q8, rs = quantize_q(q, score_scale(d), False)
    k8, ks = quantize_k(k, k_mean(k), block_n, False)
    mag = q8.float().abs() @ k8.float().abs().transpose(-1, -2)  # (B, H, Nq, Np): sum_c |q8 k8|
    mag = mag * ks.repeat_interleave(block_n, -1)[:, :, None, :]
    return 2 * (d // MMA_K) * 2.0 ** -HOPPER_MMA_BITS * rs * mag[..., :k.shape[1]].amax(-1)


def emulation_tolerance(model_dev: float) -> float:
    """Check 2: the output's rel. RMS distance to the emulation, given the HOPPER emulation's."""
    return MODEL_FACTOR * model_dev + OUT_FLOOR


def fp32_tolerance(predicted: float, model_dev: float = HOPPER_DEV_MAX) -> float:
    """Check 3: the output's rel. RMS error against fp32 attention, given the predicted one (the
    HOPPER deviation at its largest seen where it was not computed, as in the config sweep)."""
    return PREDICTED_FACTOR * predicted + emulation_tolerance(model_dev)


def check_output(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int,
                 fp8_v: bool, qk_int8: bool) -> dict:
    """The three checks of the module docstring on a kernel's (out, lse) for (q, k, v). Returns the
    figures, each tolerance, `failed` (the names of the checks that failed) and `ok`."""
    emu, emu_lse = fp8_attention_reference(q, k, v, block_n, fp8_v, qk_int8, EXACT)
    if qk_int8 and not fp8_v:  # no 8-bit float MMA: nothing of HOPPER's applies
        model_dev = 0.0
    else:
        model_dev = rel_errors(fp8_attention_reference(q, k, v, block_n, fp8_v, qk_int8, HOPPER)[0], emu)["rel_rms"]
    ref, _ = fp32_attention(q, k, v)
    lse_tol = LN2 * score_bound(q, k, block_n, qk_int8) + LSE_FLOOR
    lse_dev = (lse.float() - emu_lse).abs()
    vs_emu, vs_fp32 = rel_errors(out, emu), rel_errors(out, ref)
    emu_tol = emulation_tolerance(model_dev)
    predicted = predicted_error(q, k, v, block_n, fp8_v, qk_int8)
    fp32_tol = fp32_tolerance(predicted, model_dev)
    r = {"vs_emulation": vs_emu, "emulation_tol_rms": emu_tol, "hopper_model_rms": model_dev,
         "lse_abs": float(lse_dev.max()), "lse_tol_min": float(lse_tol.min()), "lse_worst_ratio": float((lse_dev / lse_tol).max()),
         "vs_fp32": vs_fp32, "emulation_vs_fp32": rel_errors(emu, ref), "predicted_rms": predicted, "fp32_tol_rms": fp32_tol}
    failed = []
    if not (bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())):
        failed.append("finite")
    if not bool((lse_dev <= lse_tol).all()):
        failed.append("lse")
    if not vs_emu["rel_rms"] <= emu_tol:
        failed.append("out_vs_emulation")
    if not vs_fp32["rel_rms"] <= fp32_tol:
        failed.append("out_vs_fp32")
    r.update(failed=failed, ok=not failed)
    return r
