"""8-bit attention (layers/fp8_attention*.py) against cuDNN bf16 SDPA: speed and error, one GPU.

  python benchmark/bench_attention.py --out benchmark/results/bench_attention_h100_DATE.json
  python benchmark/bench_attention.py --smoke        # correctness on small shapes only (~30 s)

1. Smoke (always first): every format at a few small shapes (head dim 128 and 64, batch 2, key
   counts ending in a partial tile, a strided q view) against the pure-torch emulation of the
   kernel (fp8_attention_ref.py, fp32 on the GPU) and against bf16 SDPA; also the wired path
   (set_attention_backend + attention_lse). Stops with exit code 1 and the failing case if any
   is off, so a broken kernel costs seconds, not the sweep.
2. Sweep at --sweep-tokens (32,640): each format's candidate tile configs (compile time, ms,
   error vs cuDNN as a guard: a fast wrong config cannot win); the best per format is kept.
3. Each shape (B=1, 32 heads, d=128): N x N for --sizes, and --cross (65,536 queries over 369,240
   keys): cuDNN bf16 and each format at its best config, quantization included (the K mean, V
   range and the three quantization launches), TFLOP/s as 4 Nq Nk d H / t; errors vs cuDNN's bf16
   output (relative max, relative RMS) and vs fp32 attention on 256 sampled query rows, on
   normal data and on `outliers` (2% of the tokens of q, k, v x10-50 and 4 channels per head x10)
   and `qknorm` (q/k with per-channel gains as RMSNorm weights give, v with the token outliers).
   The extra data kinds skip N x N shapes above --extra-data-max-tokens (each call there costs
   seconds; the cross shape covers 369K keys).
A table is printed last; JSON (device, date, command, versions, everything above) to --out.
--budget-s stops starting new shapes past that many seconds (noted in the table and JSON).
On CPU (--device cpu, tiny --sizes) the plumbing runs with the emulation in place of the kernel,
or, under TRITON_INTERPRET=1 with triton importable, with the kernel interpreted.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from ltx2_tp.layers import attention_backend as ab  # noqa: E402
from ltx2_tp.layers.fp8_attention import FORMATS, kernel_config, unavailable_reason  # noqa: E402
from ltx2_tp.layers.fp8_attention_ref import fp8_attention_reference  # noqa: E402

# candidate (block_m, block_n, num_warps, num_stages, tma[, maxnreg]) per P.V format. Triton 3.6
# waits for each wgmma right after issuing it, so a CTA's softmax and MMAs do not overlap; 64-row
# tiles with 4 warps fit 2-3 CTAs per SM (sm_90 compile: 139-186 registers, 57-107 KB shared;
# maxnreg 168 makes 3 fit), which then overlap each other. 128-row tiles with 8 warps (1 CTA per
# SM) read each K/V tile for twice the rows (half the L2 traffic per FLOP).
SWEEP_FP8_V = [(128, 128, 8, 2, 1), (128, 128, 8, 3, 1), (128, 64, 8, 3, 1), (64, 128, 4, 2, 1),
               (64, 128, 4, 2, 1, 168), (64, 128, 4, 3, 1), (64, 64, 4, 3, 1), (64, 64, 4, 4, 1), (128, 128, 8, 2, 0)]
SWEEP_BF16_V = [(128, 64, 8, 3, 1), (128, 128, 8, 2, 1), (64, 64, 4, 2, 1), (64, 64, 4, 3, 1)]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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

    def quantized(self, q, k, v, fmt: str, cfg):
        qk_int8, fp8_v = FORMATS[fmt]
        if self.kernel:
            return self.fk.attention_fwd(q, k, v, qk_int8, fp8_v, cfg)
        return fp8_attention_reference(q, k, v, cfg[1], fp8_v, qk_int8)

    def time(self, fn, warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out


def make_qkv(kind: str, b: int, nq: int, nk: int, h: int, d: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    q, k, v = randn(b, nq, h, d), randn(b, nk, h, d), randn(b, nk, h, d)
    k += randn(1, 1, h, d)  # a per-head channel offset, as K has (the smoothing removes it)
    if kind == "normal":
        pass
    elif kind in ("outliers", "qknorm"):
        def token_outliers(t):
            n = t.shape[1]
            idx = torch.randint(0, n, (max(1, n // 50),), generator=g, device=device)
            t[:, idx] *= torch.rand(len(idx), 1, 1, generator=g, device=device) * 40 + 10

        if kind == "outliers":
            for t in (q, k, v):
                token_outliers(t)
                mult = torch.ones(h, d, device=device)
                mult.scatter_(1, torch.randint(0, d, (h, 4), generator=g, device=device), 10.0)
                t *= mult
        else:
            gain = torch.exp(randn(h, d) * 0.7)
            q *= gain
            k *= gain
            token_outliers(v)
    else:
        raise ValueError(f"--data: unknown kind {kind!r} (normal, outliers, qknorm)")
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def fp32_rows(q, k, v, rows):
    """Exact attention (fp32, per head) for the query rows `rows`: out (B, r, H, d), lse (B, H, r)."""
    qs = q[:, rows].float()
    outs, lses = [], []
    for hh in range(q.shape[2]):
        s = qs[:, :, hh] @ k[:, :, hh].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        lses.append(s.logsumexp(-1))
        outs.append(torch.softmax(s, -1) @ v[:, :, hh].float())
        del s
    return torch.stack(outs, 2), torch.stack(lses, 1)


def errors(out, ref) -> dict:
    a, b = out.float(), ref.float()
    diff = a - b
    return {"rel_max": float(diff.abs().max() / b.abs().max().clamp_min(1e-30)),
            "rel_rms": float(diff.pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))}


def default_tuple(run: Runner, fmt: str) -> tuple:
    if not run.kernel:
        return (64, 64, 4, 2, 0)
    c = run.fk.DEFAULT_CONFIGS[FORMATS[fmt]]
    return (c.block_m, c.block_n, c.num_warps, c.num_stages, int(c.tma), *([c.maxnreg] if c.maxnreg else []))


# ---- 1. smoke -------------------------------------------------------------------------------------


def smoke(run: Runner, dev) -> dict:
    """Small shapes vs the emulation; returns the worst errors, raises SystemExit(1) on a failure."""
    # (B, Nq, Nk, H, d, config or None for each format's default: what users get, and compiled once
    # for the sweep too, as token counts are not specialized on)
    cases = [(2, 1000, 1500, 4, 128, None), (1, 257, 4099, 2, 64, (128, 64, 8, 2, 1))]
    if dev.type == "cpu":
        cases = [(2, 40, 150, 2, 128, (64, 64, 4, 2, 1)), (1, 33, 70, 2, 64, (32, 32, 4, 2, 1))]
    report, failures = {}, []
    for b, nq, nk, h, d, tile in cases:
        q, k, v = make_qkv("normal", b, nq + 1, nk, h, d, dev, seed=nq)
        q = q[:, 1:]  # a strided view, as the chunked path passes
        sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        for fmt, (qk_int8, fp8_v) in FORMATS.items():
            t = tile or default_tuple(run, fmt)
            name = f"{fmt} B{b} Nq{nq} Nk{nk} H{h} d{d} {','.join(map(str, t))}"
            try:
                out, lse = run.quantized(q, k, v, fmt, run.config(t))
                ref, ref_lse = fp8_attention_reference(q, k, v, t[1], fp8_v, qk_int8)
                e_ref, e_sdpa, e_emu = errors(out, ref), errors(out, sdpa), errors(ref, sdpa)
                e_lse = float((lse - ref_lse).abs().max())
                report[name] = {"vs_emulation": e_ref, "lse_abs": e_lse, "vs_sdpa": e_sdpa, "emulation_vs_sdpa": e_emu}
                # as close to the emulation as the GPU's MMA sums allow, and no further from SDPA than it
                ok = (bool(torch.isfinite(out).all()) and e_ref["rel_rms"] < 5e-3 and e_ref["rel_max"] < 5e-2
                      and e_lse < 1e-3 and e_sdpa["rel_rms"] <= 1.25 * e_emu["rel_rms"] + 2e-3)
                print(f"smoke {name:42s} vs emulation rms {e_ref['rel_rms']:.1e} max {e_ref['rel_max']:.1e} "
                      f"lse {e_lse:.1e} | vs sdpa rms {e_sdpa['rel_rms']:.1e} (emulation {e_emu['rel_rms']:.1e}) "
                      f"{'ok' if ok else 'WRONG'}", flush=True)
                if not ok:
                    failures.append(name)
            except Exception:
                traceback.print_exc()
                failures.append(name + " (raised)")
    if dev.type == "cuda":  # the wired path: backend name -> custom op -> kernel, with the LSE
        q, k, v = make_qkv("normal", 1, 500, 2500, 4, 128, dev, seed=7)  # >= MIN_KEYS: routed to the op
        for fmt, (qk_int8, fp8_v) in FORMATS.items():
            ab.set_attention_backend(fmt)
            out, lse = ab.attention_lse(q, k, v)
            ab._BACKEND = "auto"
            bn = kernel_config(qk_int8, fp8_v, torch.cuda.get_device_capability()).block_n
            ref, ref_lse = fp8_attention_reference(q, k, v, bn, fp8_v, qk_int8)
            bad = not (errors(out, ref)["rel_rms"] < 5e-3 and float((lse - ref_lse).abs().max()) < 1e-3)
            print(f"smoke wired attention_lse --attention {fmt} (custom op, config "
                  f"{','.join(map(str, default_tuple(run, fmt)))}): {'WRONG' if bad else 'ok'}", flush=True)
            if bad:
                failures.append(f"wired {fmt}")
    if failures:
        print("SMOKE FAILED, the 8-bit attention kernel is wrong here: " + "; ".join(failures), flush=True)
        raise SystemExit(1)
    return report


# ---- 2. sweep -----------------------------------------------------------------------------------------


def sweep(run: Runner, dev, n: int, h: int, d: int, formats, reps: int) -> tuple[dict, dict]:
    q, k, v = make_qkv("normal", 1, n, n, h, d, dev)
    base = run.baseline(q, k, v)
    results, best = {}, {}
    for fmt in formats:
        cands = SWEEP_FP8_V if FORMATS[fmt][1] else SWEEP_BF16_V
        if not run.kernel:
            cands = [(64, 64, 4, 2, 0)]
        # the guard: a config may be no further from cuDNN than the emulation (its tile's K blocks)
        qk_int8, fp8_v = FORMATS[fmt]
        emu = {bn: errors(fp8_attention_reference(q, k, v, bn, fp8_v, qk_int8)[0], base)["rel_rms"]
               for bn in sorted({t[1] for t in cands})}
        for t in cands:
            key = f"{fmt} {','.join(map(str, t))}"
            try:
                cfg = run.config(t)
                t0 = time.perf_counter()
                out, _ = run.quantized(q, k, v, fmt, cfg)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                e = errors(out, base)
                del out
                ms = 1e3 * min(run.time(lambda: run.quantized(q, k, v, fmt, cfg), 1, reps))
                ok = math.isfinite(e["rel_rms"]) and e["rel_rms"] <= 1.25 * emu[t[1]] + 2e-3
                results[key] = {"ms": ms, "tflops": 4.0 * n * n * d * h / ms / 1e9, "compile_s": compile_s,
                                "vs_cudnn": e, "emulation_vs_cudnn": emu[t[1]], "ok": ok}
                kern = getattr(run.fk, "last_kernel", None) if run.kernel else None
                if kern is not None and hasattr(kern, "n_regs"):
                    results[key].update(regs=kern.n_regs, spills=kern.n_spills, shared=kern.metadata.shared)
                print(f"sweep N={n} {key:26s} {ms:8.2f} ms {results[key]['tflops']:5.0f} TFLOP/s  first call "
                      f"{compile_s:5.1f} s  regs {results[key].get('regs', '-')} spills {results[key].get('spills', '-')}"
                      f"  rms vs cuDNN {e['rel_rms']:.1e} (emulation {emu[t[1]]:.1e}){'' if ok else '  REJECTED'}",
                      flush=True)
                if ok and (fmt not in best or ms < results[best[fmt]]["ms"]):
                    best[fmt] = key
            except Exception as exc:  # a config that does not compile or launch here
                results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                print(f"sweep N={n} {key:24s} failed: {results[key]['error']}", flush=True)
    base_ms = 1e3 * min(run.time(lambda: run.baseline(q, k, v), 1, reps))
    results["cudnn_bf16"] = {"ms": base_ms, "tflops": 4.0 * n * n * d * h / base_ms / 1e9}
    print(f"sweep N={n} cudnn bf16 {base_ms:8.2f} ms {results['cudnn_bf16']['tflops']:5.0f} TFLOP/s", flush=True)
    return results, {fmt: tuple(int(x) for x in key.split()[1].split(",")) for fmt, key in best.items()}


# ---- 3. shapes ---------------------------------------------------------------------------------------


def bench_shape(run: Runner, dev, nq: int, nk: int, h: int, d: int, formats, configs, kinds, reps: int,
                extra_max: int) -> dict:
    flops = 4.0 * nq * nk * d * h
    reps = reps if nq * nk < 2e10 else max(1, reps - 1)  # 369K x 369K: ~3-4 s a call
    res = {"nq": nq, "nk": nk, "heads": h, "head_dim": d, "flops": flops, "methods": {}}
    rows = torch.linspace(0, nq - 1, min(256, nq), device=dev).long()
    for kind in kinds:
        if kind != "normal" and nq == nk and nq > extra_max:
            continue
        q, k, v = make_qkv(kind, 1, nq, nk, h, d, dev, seed=1)
        ref_rows, ref_lse = fp32_rows(q, k, v, rows)
        base = run.baseline(q, k, v)
        m = res["methods"].setdefault("cudnn_bf16", {})
        if kind == "normal":  # the call above was the warm-up
            ts = run.time(lambda: run.baseline(q, k, v), 0, reps)
            m.update(ms=1e3 * min(ts), tflops=flops / min(ts) / 1e12)
        m[kind] = {"vs_fp32_rows": errors(base[:, rows], ref_rows)}
        for fmt in formats:
            cfg = run.config(configs[fmt])
            mm = res["methods"].setdefault(fmt, {"config": list(configs[fmt])})
            out, lse = run.quantized(q, k, v, fmt, cfg)
            mm[kind] = {"vs_cudnn": errors(out, base), "vs_fp32_rows": errors(out[:, rows], ref_rows),
                        "lse_abs_vs_fp32_rows": float((lse[..., rows] - ref_lse).abs().max())}
            del out, lse
            if kind == "normal":
                ts = run.time(lambda: run.quantized(q, k, v, fmt, cfg), 0, reps)
                mm.update(ms=1e3 * min(ts), tflops=flops / min(ts) / 1e12)
                if run.kernel:  # the quantization share of that time
                    qk_int8, fp8_v = FORMATS[fmt]
                    tq = run.time(lambda: run.fk.quantize_qkv(q, k, v, qk_int8, fp8_v, cfg), 1, 2)
                    mm["quantize_ms"] = 1e3 * min(tq)
        del q, k, v, base
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    cud = res["methods"]["cudnn_bf16"]["ms"]
    for name, mm in res["methods"].items():
        if "ms" in mm:
            mm["x_cudnn"] = cud / mm["ms"]
    print(f"shape {nq}x{nk}: " + ", ".join(f"{n} {mm.get('tflops', 0):.0f} TFLOP/s" for n, mm in res["methods"].items()),
          flush=True)
    return res


def table(results: dict) -> str:
    lines = ["| Nq x Nk | method | config | ms | TFLOP/s | x cuDNN | quant ms | normal: rel max / rel RMS vs cuDNN | "
             "rel RMS vs fp32 (normal / outliers / qknorm) |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in results["shapes"]:
        for name, m in shape["methods"].items():
            n = m.get("normal", {})
            vs = n.get("vs_cudnn")
            fp32 = " / ".join(f"{m[kd]['vs_fp32_rows']['rel_rms']:.1e}" if kd in m else "-"
                              for kd in ("normal", "outliers", "qknorm"))
            cfg = ",".join(map(str, m.get("config", []))) or "-"
            vs_txt = f"{vs['rel_max']:.1e} / {vs['rel_rms']:.1e}" if vs else "-"
            lines.append(f"| {shape['nq']}x{shape['nk']} | {name} | {cfg} | {m.get('ms', float('nan')):.1f} | "
                         f"{m.get('tflops', float('nan')):.0f} | {m.get('x_cudnn', float('nan')):.2f} | "
                         f"{m.get('quantize_ms', float('nan')):.2f} | {vs_txt} | {fp32} |")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    best = results.get("best_configs", {})
    if best:
        lines.append("best configs (LTX2_TP_FP8_ATTN_CONFIG / fp8_attention_kernel.DEFAULT_CONFIGS): " +
                     "  ".join(f"{f}={','.join(map(str, c))}" for f, c in best.items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--smoke", action="store_true", help="only the correctness smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--sizes", default="32640,124440,369240", help="N for N x N self-attention")
    ap.add_argument("--cross", default="65536x369240", help="NqxNk shapes, comma-separated ('' for none)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sweep-tokens", type=int, default=32640, help="N of the config sweep (0: default configs)")
    ap.add_argument("--data", default="normal,outliers,qknorm")
    ap.add_argument("--extra-data-max-tokens", type=int, default=130_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0, help="start no new shape after this many seconds (0: none)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    dev = torch.device(args.device)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in FORMATS:
            raise SystemExit(f"--formats: {f!r} is not one of {list(FORMATS)}")
    kinds = [k for k in args.data.split(",") if k]
    if dev.type == "cuda" and (reason := unavailable_reason()):
        raise SystemExit(f"bench_attention: {reason}")
    run = Runner(dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    triton_version = None
    if run.kernel:
        import triton

        triton_version = triton.__version__
    results = {"device": name, "date": str(datetime.date.today()), "command": "python " + " ".join(sys.argv),
               "torch": torch.__version__, "triton": triton_version, "kernel": run.kernel, "notes": []}
    results["smoke"] = smoke(run, dev)
    print(f"smoke ok ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if args.smoke:
        return _finish(results, args)

    if args.sweep_tokens:
        results["sweep"], best = sweep(run, dev, args.sweep_tokens, args.heads, args.head_dim, formats, args.reps + 2)
    else:
        best = {}
    for f in formats:
        if f not in best:
            best[f] = default_tuple(run, f)
    results["best_configs"] = best
    shapes = [(n, n) for n in (int(x) for x in args.sizes.split(",") if x)]
    shapes += [tuple(int(y) for y in x.split("x")) for x in args.cross.split(",") if x]
    results["shapes"] = []
    for nq, nk in shapes:
        elapsed = time.perf_counter() - t_start
        if args.budget_s and elapsed > args.budget_s:
            results["notes"].append(f"{nq}x{nk} skipped: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}")
            continue
        try:
            results["shapes"].append(bench_shape(run, dev, nq, nk, args.heads, args.head_dim, formats, best, kinds,
                                                 args.reps, args.extra_data_max_tokens))
        except Exception as exc:  # e.g. out of memory: keep what was measured
            traceback.print_exc()
            results["notes"].append(f"{nq}x{nk} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    results["total_s"] = time.perf_counter() - t_start
    print(table(results))
    return _finish(results, args)


def _finish(results, args):
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
