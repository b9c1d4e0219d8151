"""8-bit attention (layers/fp8_attention*.py) against cuDNN bf16 SDPA: speed and error, one GPU.

  python benchmark/bench_attention.py --out benchmark/results/bench_attention_h100_DATE.json  # < 200 s on an H100
  python benchmark/bench_attention.py --smoke      # correctness only (~40 s); exit code 1 if a format fails
  python benchmark/bench_attention.py --explain    # the emulation's GPU-arithmetic switches, sized (CPU is fine)

Phases, each timed ("phase NAME: N s"); no format stops the run: a format that fails or raises
is marked in the table, and the others go on. JSON (device, date, command, versions, every figure)
is rewritten to --out after each phase, so a run cut short keeps what it measured.
1. smoke: every format, its default config, B2 x 1000 queries (a strided view) x 1,290 keys (both
   tile sizes end in a partial tile), 4 heads, d 128, on `qknorm` data (what the model feeds
   attention), judged by layers/fp8_attention_check.py (LSE and output against the emulation,
   output against fp32 attention, each tolerance derived from a rounding step); `normal` and
   `outliers` data are reported, not judged. Then the wired path (set_attention_backend ->
   attention_lse -> the custom op) must give the direct kernel call's numbers bit for bit.
2. sweep at --sweep-tokens (32,640), `normal` data: at most six tile configs (SWEEP; all compile
   for sm_90 without spills: test_fp8_attention.py), on fp8 and fp8_qk; the int8 formats take
   the best of the same P.V family (same MMA shapes and rates). A config whose error against fp32
   (sampled rows) exceeds the check's tolerance is rejected.
3. shapes: N x N for --sizes (32,640 and 124,440 tokens: 1080p x 121 and x 481), batch 1, 32
   heads, d 128; cuDNN bf16 and every format at its best config, quantization included (TFLOP/s =
   4 Nq Nk d H / t); errors on `normal`, `qknorm`, `outliers` data against cuDNN's bf16 output
   (whole tensor) and against fp32 attention (256 sampled query rows).
4. --big (369,240: 1080p x 1441) last, only if the run is under --budget-s, for the two formats
   fastest at the previous shape (those that passed the smoke first), `normal` and `qknorm` data,
   one timed call after the error call (~4 s a call for cuDNN there).
The table comes last. On CPU (--device cpu, tiny --sizes) the plumbing runs with the emulation in
place of the kernel, or under TRITON_INTERPRET=1 with the kernel interpreted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from ltx2_tp.layers import attention_backend as ab  # noqa: E402
from ltx2_tp.layers.fp8_attention import FORMATS, kernel_config, unavailable_reason  # noqa: E402
from ltx2_tp.layers.fp8_attention_check import (check_output, fp32_attention, fp32_tolerance,  # noqa: E402
                                                predicted_error, rel_errors)
from ltx2_tp.layers.fp8_attention_ref import GpuArithmetic, HOPPER, fp8_attention_reference  # noqa: E402

# (block_m, block_n, num_warps, num_stages, tma[, maxnreg]) per P.V family; the first is the
# default (fp8_attention_kernel.DEFAULT_CONFIGS). sm_90 compile: 165-186 registers, no spills.
# 64-row tiles with 4 warps fit 2-3 CTAs per SM (maxnreg 168: 3), which overlap each other's
# softmax and MMAs (Triton 3.6 waits for each wgmma); 128-row tiles with 8 warps read each K/V
# tile for twice the rows.
SWEEP = {True: [(64, 128, 4, 2, 1, 168), (128, 128, 8, 2, 1), (128, 64, 8, 3, 1)],
         False: [(64, 64, 4, 2, 1), (128, 64, 8, 3, 1), (128, 128, 8, 2, 1)]}
SWEPT = {True: "fp8", False: "fp8_qk"}  # the format that sweeps for its P.V family
ROWS = 256  # sampled query rows for the fp32 reference

# H100, 2026-11-23, B2 Nq1000 Nk1500 H4 d128 `normal` data, kernel with the quantization's `/`
# (div.full.f32) vs the emulation: rel. RMS of the output, max |d LSE| (--explain compares)
GPU_2026_11_23 = {"fp8": (5.8e-3, 6.5e-3), "fp8_qk": (2.3e-3, 6.6e-3), "int8_fp8": (2.7e-3, 1.1e-3),
                  "int8_qk": (7.2e-4, 1.1e-3)}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tile_text(t) -> str:
    return ",".join(map(str, t))


class Runner:
    """Times and runs cuDNN bf16 SDPA and the quantized kernel (or, on CPU, their stand-ins)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kernel = device.type == "cuda" or interpreted()
        if self.kernel:
            if interpreted():
                sys.path.insert(0, str(ROOT / "test"))
                import triton_interpret_shim  # noqa: F401
            from ltx2_tp.layers import fp8_attention_kernel as fk

            self.fk = fk

    def baseline(self, q, k, v):
        if self.device.type == "cuda":
            ab.set_attention_backend("cudnn")
        try:
            return ab.attention(q, k, v)
        finally:
            ab._BACKEND = "auto"

    def config(self, t):
        return self.fk.KernelConfig(*t[:4], bool(t[4]), t[5] if len(t) > 5 else None) if self.kernel else t

    def default_tuple(self, fmt: str) -> tuple:
        if not self.kernel:
            return SWEEP[FORMATS[fmt][1]][0]
        c = self.fk.DEFAULT_CONFIGS[FORMATS[fmt]]
        return (c.block_m, c.block_n, c.num_warps, c.num_stages, int(c.tma), *([c.maxnreg] if c.maxnreg else []))

    def quantized(self, q, k, v, fmt: str, t):
        qk_int8, fp8_v = FORMATS[fmt]
        if self.kernel:
            return self.fk.attention_fwd(q, k, v, qk_int8, fp8_v, self.config(t))
        return fp8_attention_reference(q, k, v, t[1], fp8_v, qk_int8)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, warmup: int, reps: int) -> float:
        """Seconds of the fastest of `reps` calls."""
        for _ in range(warmup):
            fn()
        best = math.inf
        for _ in range(reps):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                best = min(best, a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        return best


def make_qkv(kind: str, b: int, nq: int, nk: int, h: int, d: int, device, seed: int = 0):
    """bf16 (B, N, H, d) q, k, v of a data kind:
    - qknorm: as the model feeds attention: q and k RMS-normed over the heads' channels with affine
      weights ~1 (1 + 0.1 N(0,1)) and k with a channel offset before its norm; v ~ N(0, 1).
    - normal: N(0, 1), k with a per-head channel offset N(0, 1) (the first GPU smoke's data).
    - outliers: normal, then 2% of the tokens of q, k, v x10-50 and 4 channels per head x10."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    if kind == "qknorm":
        def rms_norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean((-1, -2), keepdim=True)) * w

        q = rms_norm(randn(b, nq, h, d), 1 + 0.1 * randn(h, d))
        k = rms_norm(randn(b, nk, h, d) + 0.5 * randn(h, d), 1 + 0.1 * randn(h, d))
        v = randn(b, nk, h, d)
        return q.bfloat16(), k.bfloat16(), v.bfloat16()
    if kind not in ("normal", "outliers"):
        raise ValueError(f"--data: unknown kind {kind!r} (normal, qknorm, outliers)")
    q, k, v = randn(b, nq, h, d), randn(b, nk, h, d), randn(b, nk, h, d)
    k += randn(1, 1, h, d)
    if kind == "outliers":
        for t in (q, k, v):
            n = t.shape[1]
            idx = torch.randint(0, n, (max(1, n // 50),), generator=g, device=device)
            t[:, idx] *= torch.rand(len(idx), 1, 1, generator=g, device=device) * 40 + 10
            mult = torch.ones(h, d, device=device)
            mult.scatter_(1, torch.randint(0, d, (h, 4), generator=g, device=device), 10.0)
            t *= mult
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


# ---- 1. smoke -------------------------------------------------------------------------------------


def smoke(run: Runner, dev, formats) -> dict:
    """Each format's default config on small shapes: {fmt: {ok, data kind -> figures, wired}}."""
    b, nq, nk, h, d = (2, 1000, 1290, 4, 128) if dev.type == "cuda" else (1, 40, 150, 2, 128)
    kinds = ("qknorm", "normal", "outliers")
    data = {}
    for kind in kinds:
        q, k, v = make_qkv(kind, b, nq + 1, nk, h, d, dev, seed=nq)
        data[kind] = (q[:, 1:], k, v)  # q: a strided view, as the chunked path passes
    report = {}
    for fmt in formats:
        qk_int8, fp8_v = FORMATS[fmt]
        t = run.default_tuple(fmt)
        rep = report[fmt] = {"config": list(t), "ok": False}
        try:
            for kind in kinds:
                q, k, v = data[kind]
                out, lse = run.quantized(q, k, v, fmt, t)
                if kind == "outliers":  # reported only: the first-order tolerances do not hold there
                    emu = fp8_attention_reference(q, k, v, t[1], fp8_v, qk_int8)[0]
                    rep[kind] = {"vs_emulation": rel_errors(out, emu), "vs_fp32": rel_errors(out, fp32_attention(q, k, v)[0])}
                    print(f"smoke {fmt:8s} {kind:8s} vs emulation rms {rep[kind]['vs_emulation']['rel_rms']:.1e} | "
                          f"vs fp32 rms {rep[kind]['vs_fp32']['rel_rms']:.1e} (reported, not judged)", flush=True)
                    continue
                c = rep[kind] = check_output(out, lse, q, k, v, t[1], fp8_v, qk_int8)
                judged = kind == "qknorm"
                if judged:
                    rep["ok"] = c["ok"]
                print(f"smoke {fmt:8s} {kind:8s} vs emulation rms {c['vs_emulation']['rel_rms']:.1e} "
                      f"(tol {c['emulation_tol_rms']:.1e}) max {c['vs_emulation']['rel_max']:.1e} | "
                      f"lse {c['lse_abs']:.1e} (worst/tol {c['lse_worst_ratio']:.2f}) | vs fp32 rms "
                      f"{c['vs_fp32']['rel_rms']:.1e} (tol {c['fp32_tol_rms']:.1e}, predicted {c['predicted_rms']:.1e}) "
                      f"{('ok' if c['ok'] else 'WRONG: ' + ','.join(c['failed'])) if judged else '(reported)'}", flush=True)
            if dev.type == "cuda":
                rep["wired"] = wired(run, fmt)
                rep["ok"] = rep["ok"] and rep["wired"]["identical"]
        except Exception as exc:
            traceback.print_exc()
            rep["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"smoke {fmt} raised: {rep['error']}", flush=True)
    return report


def wired(run: Runner, fmt: str) -> dict:
    """set_attention_backend(fmt) -> attention_lse -> the custom op: the direct call's numbers?"""
    qk_int8, fp8_v = FORMATS[fmt]
    q, k, v = make_qkv("qknorm", 1, 500, 2500, 4, 128, run.device, seed=7)  # >= MIN_KEYS: routed to the op
    ab.set_attention_backend(fmt)
    try:
        out, lse = ab.attention_lse(q, k, v)
    finally:
        ab._BACKEND = "auto"
    cfg = kernel_config(qk_int8, fp8_v, torch.cuda.get_device_capability())
    ref, ref_lse = run.fk.attention_fwd(q, k, v, qk_int8, fp8_v, cfg)
    r = {"config": cfg.describe(), "identical": bool(torch.equal(out, ref) and torch.equal(lse, ref_lse)),
         "out_max_abs": float((out.float() - ref.float()).abs().max()), "lse_max_abs": float((lse - ref_lse).abs().max())}
    print(f"smoke {fmt:8s} wired attention_lse (custom op, {r['config']}) vs direct call: "
          f"{'bit-identical' if r['identical'] else 'DIFFERS: out %.1e lse %.1e' % (r['out_max_abs'], r['lse_max_abs'])}",
          flush=True)
    return r


# ---- 2. sweep -------------------------------------------------------------------------------------


def sweep(run: Runner, dev, n: int, h: int, d: int, formats, reps: int) -> tuple[dict, dict]:
    """{key: figures}, {fmt: best tuple}."""
    q, k, v = make_qkv("normal", 1, n, n, h, d, dev)
    rows = torch.linspace(0, n - 1, min(ROWS, n), device=dev).long()
    ref_rows, _ = fp32_attention(q, k, v, rows)
    results, best = {}, {}
    for fp8_v, fmt in SWEPT.items():
        family = [f for f in formats if FORMATS[f][1] == fp8_v]
        if not family:
            continue
        fmt = fmt if fmt in family else family[0]
        qk_int8 = FORMATS[fmt][0]
        cands = SWEEP[fp8_v] if run.kernel else SWEEP[fp8_v][:1]
        tol = {}
        for t in cands:
            key = f"{fmt} {tile_text(t)}"
            try:
                if t[1] not in tol:
                    tol[t[1]] = fp32_tolerance(predicted_error(q, k, v, t[1], fp8_v, qk_int8, rows[::4]))
                t0 = time.perf_counter()
                out, _ = run.quantized(q, k, v, fmt, t)
                run.sync()
                first_s = time.perf_counter() - t0
                e = rel_errors(out[:, rows], ref_rows)
                del out
                sec = run.time(lambda: run.quantized(q, k, v, fmt, t), 1, reps)
                ok = e["rel_rms"] <= tol[t[1]]
                results[key] = {"ms": 1e3 * sec, "tflops": 4.0 * n * n * d * h / sec / 1e12, "first_call_s": first_s,
                                "vs_fp32_rows": e, "tol_rms": tol[t[1]], "ok": ok}
                kern = getattr(run.fk, "last_kernel", None) if run.kernel else None
                if kern is not None and hasattr(kern, "n_regs"):
                    results[key].update(regs=kern.n_regs, spills=kern.n_spills, shared=kern.metadata.shared)
                print(f"sweep N={n} {key:26s} {1e3 * sec:8.2f} ms {results[key]['tflops']:5.0f} TFLOP/s  first call "
                      f"{first_s:5.1f} s  regs {results[key].get('regs', '-')} spills {results[key].get('spills', '-')}  "
                      f"rms vs fp32 {e['rel_rms']:.1e} (tol {tol[t[1]]:.1e}){'' if ok else '  REJECTED'}", flush=True)
                if ok and (fp8_v not in best or sec < best[fp8_v][1]):
                    best[fp8_v] = (t, sec)
            except Exception as exc:  # a config that does not compile or launch here
                results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                print(f"sweep N={n} {key:26s} failed: {results[key]['error']}", flush=True)
    sec = run.time(lambda: run.baseline(q, k, v), 1, reps)
    results["cudnn_bf16"] = {"ms": 1e3 * sec, "tflops": 4.0 * n * n * d * h / sec / 1e12}
    print(f"sweep N={n} cudnn bf16 {1e3 * sec:8.2f} ms {results['cudnn_bf16']['tflops']:5.0f} TFLOP/s", flush=True)
    return results, {f: best[FORMATS[f][1]][0] for f in formats if FORMATS[f][1] in best}


# ---- 3. shapes ------------------------------------------------------------------------------------


def bench_shape(run: Runner, dev, nq: int, nk: int, h: int, d: int, formats, configs, kinds, reps: int) -> dict:
    flops = 4.0 * nq * nk * d * h
    res = {"nq": nq, "nk": nk, "heads": h, "head_dim": d, "flops": flops, "methods": {}}
    rows = torch.linspace(0, nq - 1, min(ROWS, nq), device=dev).long()
    for kind in kinds:
        q, k, v = make_qkv(kind, 1, nq, nk, h, d, dev, seed=1)
        ref_rows, ref_lse = fp32_attention(q, k, v, rows)
        base = run.baseline(q, k, v)  # on `normal`, also the warm-up
        m = res["methods"].setdefault("cudnn_bf16", {})
        m[kind] = {"vs_fp32_rows": rel_errors(base[:, rows], ref_rows)}
        if kind == "normal":
            sec = run.time(lambda: run.baseline(q, k, v), 0, reps)
            m.update(ms=1e3 * sec, tflops=flops / sec / 1e12)
        for fmt in formats:
            mm = res["methods"].setdefault(fmt, {"config": list(configs[fmt])})
            try:
                out, lse = run.quantized(q, k, v, fmt, configs[fmt])
                mm[kind] = {"vs_cudnn": rel_errors(out, base), "vs_fp32_rows": rel_errors(out[:, rows], ref_rows),
                            "lse_abs_vs_fp32_rows": float((lse[..., rows] - ref_lse).abs().max())}
                del out, lse
                if kind == "normal":
                    sec = run.time(lambda: run.quantized(q, k, v, fmt, configs[fmt]), 0, reps)
                    mm.update(ms=1e3 * sec, tflops=flops / sec / 1e12)
                    if run.kernel:  # the quantization's share of that time
                        qk_int8, fp8_v = FORMATS[fmt]
                        cfg = run.config(configs[fmt])
                        mm["quantize_ms"] = 1e3 * run.time(lambda: run.fk.quantize_qkv(q, k, v, qk_int8, fp8_v, cfg), 1, 2)
            except Exception as exc:
                traceback.print_exc()
                mm.setdefault("errors", []).append(f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del q, k, v, base
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    cud = res["methods"]["cudnn_bf16"].get("ms")
    for mm in res["methods"].values():
        if "ms" in mm and cud:
            mm["x_cudnn"] = cud / mm["ms"]
    print(f"shape {nq}x{nk}: " + ", ".join(f"{n} {mm.get('tflops', 0):.0f} TFLOP/s" for n, mm in res["methods"].items()),
          flush=True)
    return res


def table(results: dict) -> str:
    smoke_ok = {f: r.get("ok") for f, r in results.get("smoke", {}).items()}
    lines = ["| Nq x Nk | method | smoke | config | ms | TFLOP/s | x cuDNN | quant ms | normal vs cuDNN bf16: rel max / rel RMS | "
             "vs fp32 rows: rel RMS (rel max), normal / qknorm / outliers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in results.get("shapes", []):
        for name, m in shape["methods"].items():
            vs = m.get("normal", {}).get("vs_cudnn")
            fp32 = " / ".join(f"{m[kd]['vs_fp32_rows']['rel_rms']:.1e} ({m[kd]['vs_fp32_rows']['rel_max']:.1e})" if kd in m
                              else "-" for kd in ("normal", "qknorm", "outliers"))
            ok = "-" if name == "cudnn_bf16" else {True: "ok", False: "FAIL", None: "?"}[smoke_ok.get(name)]
            vs_txt = f"{vs['rel_max']:.1e} / {vs['rel_rms']:.1e}" if vs else "-"
            lines.append(f"| {shape['nq']}x{shape['nk']} | {name} | {ok} | {tile_text(m.get('config', [])) or '-'} | "
                         f"{m.get('ms', math.nan):.1f} | {m.get('tflops', math.nan):.0f} | {m.get('x_cudnn', math.nan):.2f} | "
                         f"{m.get('quantize_ms', math.nan):.2f} | {vs_txt} | {fp32} |")
    for fmt, r in results.get("smoke", {}).items():
        c = r.get("qknorm", {})
        if c:
            lines.append(f"smoke {fmt}: {'ok' if r['ok'] else 'FAIL'} (qknorm vs emulation rms {c['vs_emulation']['rel_rms']:.1e}"
                         f" tol {c['emulation_tol_rms']:.1e}, lse {c['lse_abs']:.1e} at {c['lse_worst_ratio']:.2f} of tol, "
                         f"vs fp32 {c['vs_fp32']['rel_rms']:.1e} tol {c['fp32_tol_rms']:.1e}"
                         f"{', wired ' + ('identical' if r['wired']['identical'] else 'DIFFERS') if 'wired' in r else ''})")
        elif "error" in r:
            lines.append(f"smoke {fmt}: raised {r['error']}")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    if results.get("best_configs"):
        lines.append("best configs (LTX2_TP_FP8_ATTN_CONFIG / fp8_attention_kernel.DEFAULT_CONFIGS): " +
                     "  ".join(f"{f}={tile_text(c)}" for f, c in results["best_configs"].items()))
    lines.append("phases: " + ", ".join(f"{p} {s:.0f} s" for p, s in results.get("phase_s", {}).items()))
    return "\n".join(lines)


# ---- --explain -----------------------------------------------------------------------------------------

SWITCHES = {
    "fp8 MMA sum, 13 bits RZ (HOPPER)": HOPPER,
    "quotient 1 ulp off (div.full)": GpuArithmetic(quotient_ulp=True),
    "HOPPER + quotient ulp": GpuArithmetic(mma_bits=HOPPER.mma_bits, quotient_ulp=True),
    "e4m3 rounding RZ": GpuArithmetic(fp8_rounding="rz"),
    "e4m3 via fp16": GpuArithmetic(fp8_rounding="fp16"),
    "exp2 rel error 2^-22": GpuArithmetic(exp2_rel=2.0 ** -22),
    "P unscaled (no x 2^8)": GpuArithmetic(p_shift=0.0),
    "row sum of rounded P": GpuArithmetic(rowsum_rounded_p=True),
}


def explain(dev, formats, nq: int) -> dict:
    """Each GpuArithmetic switch's deviation from the exact emulation at the first GPU smoke's
    shape and data, beside what the kernel measured there (GPU_2026_11_23)."""
    q, k, v = make_qkv("normal", 2, nq + 1, 1500, 4, 128, dev, seed=nq)
    q = q[:, 1:]
    out = {}
    print(f"emulation switches vs the exact emulation, B2 Nq{nq} Nk1500 H4 d128 normal data "
          f"(H100 2026-11-23, old quantization: kernel vs emulation)")
    for fmt in formats:
        qk_int8, fp8_v = FORMATS[fmt]
        bn = 128 if fp8_v else 64  # the configs that ran
        ref, ref_lse = fp8_attention_reference(q, k, v, bn, fp8_v, qk_int8)
        gpu = GPU_2026_11_23.get(fmt)
        print(f"{fmt}: H100 measured out rms {gpu[0]:.1e}, lse {gpu[1]:.1e}" if gpu else fmt)
        for name, arith in SWITCHES.items():
            o, lse = fp8_attention_reference(q, k, v, bn, fp8_v, qk_int8, arith)
            e = rel_errors(o, ref)
            out[f"{fmt} {name}"] = dict(e, lse_abs=float((lse - ref_lse).abs().max()))
            print(f"  {name:34s} out rms {e['rel_rms']:.1e} max {e['rel_max']:.1e}  lse {out[f'{fmt} {name}']['lse_abs']:.1e}",
                  flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (rewritten after each phase)")
    ap.add_argument("--smoke", action="store_true", help="only the correctness smoke test (exit 1 if a format fails)")
    ap.add_argument("--explain", action="store_true", help="only the emulation's GPU-arithmetic switches, sized")
    ap.add_argument("--explain-queries", type=int, default=None, help="queries for --explain (1000 on a GPU, 250 on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--sizes", default="32640,124440", help="N for N x N self-attention")
    ap.add_argument("--big", default="369240", help="N x N run last, if under --budget-s ('' for none)")
    ap.add_argument("--big-formats", type=int, default=2, help="how many of the fastest formats run --big")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sweep-tokens", type=int, default=32640, help="N of the config sweep (0: default configs)")
    ap.add_argument("--data", default="normal,qknorm,outliers")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=140, help="start --big only before this many seconds (0: always)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    dev = torch.device(args.device)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in FORMATS:
            raise SystemExit(f"--formats: {f!r} is not one of {list(FORMATS)}")
    kinds = [k for k in args.data.split(",") if k]
    if "normal" not in kinds:
        kinds.insert(0, "normal")  # the timed kind
    if args.explain:
        nq = args.explain_queries or (1000 if dev.type == "cuda" else 250)
        results = {"device": str(dev), "date": str(datetime.date.today()), "explain": explain(dev, formats, nq)}
        return _write(results, args)
    if dev.type == "cuda" and (reason := unavailable_reason()):
        raise SystemExit(f"bench_attention: {reason}")
    run = Runner(dev)
    triton_version = None
    if run.kernel:
        import triton

        triton_version = triton.__version__
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "date": str(datetime.date.today()),
               "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "triton": triton_version,
               "kernel": run.kernel, "notes": [], "phase_s": {}}
    phase_t = [time.perf_counter()]

    def phase_done(name):
        now = time.perf_counter()
        results["phase_s"][name] = now - phase_t[0]
        phase_t[0] = now
        print(f"phase {name}: {results['phase_s'][name]:.0f} s (total {now - t_start:.0f} s)", flush=True)
        _write(results, args, quiet=True)

    phase_done("setup")
    results["smoke"] = smoke(run, dev, formats)
    phase_done("smoke")
    failed = [f for f, r in results["smoke"].items() if not r["ok"]]
    if failed:
        results["notes"].append("smoke failed: " + ", ".join(failed) + " (measured anyway; their errors are in the table)")
        print("SMOKE FAILED for " + ", ".join(failed), flush=True)
    if args.smoke:
        print(table(results))
        _write(results, args)
        return 1 if failed else 0

    best = {}
    if args.sweep_tokens:
        try:
            results["sweep"], best = sweep(run, dev, args.sweep_tokens, args.heads, args.head_dim, formats, args.reps + 2)
        except Exception as exc:  # e.g. out of memory: default configs
            traceback.print_exc()
            results["notes"].append(f"sweep failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        phase_done("sweep")
    for f in formats:
        best.setdefault(f, run.default_tuple(f))
    results["best_configs"] = best

    results["shapes"] = []
    for n in (int(x) for x in args.sizes.split(",") if x):
        try:
            results["shapes"].append(bench_shape(run, dev, n, n, args.heads, args.head_dim, formats, best, kinds, args.reps))
        except Exception as exc:  # e.g. out of memory: keep what was measured
            traceback.print_exc()
            results["notes"].append(f"{n}x{n} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        phase_done(f"shape {n}")

    if args.big:
        n = int(args.big)
        elapsed = time.perf_counter() - t_start
        last = results["shapes"][-1]["methods"] if results["shapes"] else {}
        ran = sorted((f for f in formats if "x_cudnn" in last.get(f, {})), key=lambda f: -last[f]["x_cudnn"])
        ranked = ([f for f in ran if results["smoke"][f]["ok"]] or ran)[:args.big_formats]  # smoke-ok first
        if args.budget_s and elapsed > args.budget_s:
            results["notes"].append(f"{n}x{n} skipped: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}")
        elif not ranked:
            results["notes"].append(f"{n}x{n} skipped: no format ran the previous shape")
        else:
            try:
                results["shapes"].append(bench_shape(run, dev, n, n, args.heads, args.head_dim, ranked, best,
                                                     [kd for kd in kinds if kd in ("normal", "qknorm")], 1))
            except Exception as exc:
                traceback.print_exc()
                results["notes"].append(f"{n}x{n} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            phase_done(f"shape {n}")
    results["total_s"] = time.perf_counter() - t_start
    print(table(results))
    _write(results, args)
    return 0


def _write(results, args, quiet: bool = False):
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        if not quiet:
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
