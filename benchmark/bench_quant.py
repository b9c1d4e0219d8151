"""One DiT step per weight storage (--quantization), 19B random weights: s/step, peak, weights, error vs bf16.

  python benchmark/bench_quant.py --case 1920x1088x121 --gemm --out benchmark/results/bench_quant_h100_<date>.json

Order: bf16 (the reference output; its block linears' input amax recorded on this very step: the
calibration the static-scale fp8-scaled-mm run uses - optimistic, the official files are calibrated
on other data), then each storage built as users get it (build_transformer: the same seed, so the
same weights, bf16 blocks converted one at a time while loading; fp8-scaled-mm-static is that with
the recorded scales, i.e. an official-format checkpoint). Eager unless --compile (the fp8 storages'
blocks compiled; eager fp8 pays its activation quantization as separate kernels), the model's own
chunk plan. Per storage: median s/step, peak GiB of the step, GiB the weights hold after building,
relative max error of video / audio vs bf16 (max|d| / max|ref|). --gemm adds the fused q/k/v GEMM
alone at this case's tokens: one row-wise GEMM (what fp8-scaled-mm runs) vs three per-tensor GEMMs
and a concatenation vs one per-tensor GEMM (one shared scale) vs bf16, and the activation
quantization. CPU (--model tiny --device cpu) only to smoke-test the script.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _sync, cuda_time, median, peak_gib, rel, reset_peak, write_json  # noqa: E402

from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.models.ltx2.quantization import build_transformer, calibrate_input_amax, describe  # noqa: E402
from ltx2_tp.step_inputs import synthetic_step_inputs  # noqa: E402

STORAGES = ("fp8-rowwise", "fp8-scaled-mm", "fp8-scaled-mm-static", "fp8-cast")


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def bench_gemm(tokens: int, d: int, device, repeat: int) -> dict:
    """The fused q/k/v projection (d -> 3d) at `tokens` rows, each way it can run (TFLOP/s)."""
    from ltx2_tp.layers.quantization.fp8_per_tensor import FP8, quantize_input

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, generator=g, device=device, dtype=torch.bfloat16)
    w = (torch.randn(3 * d, d, generator=g, device=device) * 0.02).to(FP8)
    ws = torch.tensor([1e-4, 2e-4, 3e-4], device=device)
    xs = x.abs().amax().float() / 448
    xq = quantize_input(x, xs)
    flops = 2 * tokens * d * 3 * d
    wt = w.t()
    wb = w.to(torch.bfloat16)
    runs = {
        "bf16 F.linear": lambda: torch.nn.functional.linear(x, wb),
        "row-wise, one GEMM (ours)": lambda: torch._scaled_mm(
            xq, wt, scale_a=xs.expand(tokens, 1).contiguous(), scale_b=ws.repeat_interleave(d)[None],
            out_dtype=torch.bfloat16, use_fast_accum=True),
        "per-tensor x3 + cat": lambda: torch.cat([torch._scaled_mm(
            xq, w[i * d:(i + 1) * d].t(), scale_a=xs, scale_b=ws[i], out_dtype=torch.bfloat16, use_fast_accum=True)
            for i in range(3)], -1),
        "per-tensor, one GEMM (one shared scale)": lambda: torch._scaled_mm(
            xq, wt, scale_a=xs, scale_b=ws[2], out_dtype=torch.bfloat16, use_fast_accum=True),
        "activation quantization (amax + cast)": lambda: quantize_input(x, x.abs().amax().float() / 448),
    }
    out = {}
    for name, fn in runs.items():
        t = median(cuda_time(fn, 2, repeat))
        out[name] = {"ms": t * 1e3, "tflops": flops / t / 1e12 if "quantization" not in name else None}
        print(f"  qkv {tokens}x{d}x{3 * d} {name}: {t * 1e3:.3f} ms"
              + (f", {flops / t / 1e12:.0f} TFLOP/s" if "quantization" not in name else ""), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--case", default="1920x1088x121", help="WIDTHxHEIGHTxFRAMES")
    ap.add_argument("--storages", default=",".join(STORAGES), help=f"comma list of {STORAGES}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (quick checks)")
    ap.add_argument("--compile", action="store_true", help="compile each block of the fp8 storages (a minute or "
                    "two each at 1080p); the bf16 reference stays eager unless --compile-bf16")
    ap.add_argument("--compile-bf16", action="store_true")
    ap.add_argument("--gemm", action="store_true", help="also the fused q/k/v GEMM alone, each way")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dev = torch.device(args.device)
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    w, h, f = (int(x) for x in args.case.lower().split("x"))
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    res = {"device": name, "date": str(datetime.date.today()), "command": "python " + " ".join(sys.argv),
           "torch": torch.__version__, "model": args.model, "layers": cfg.num_layers, "case": args.case, "runs": {}}
    dtype = torch.bfloat16
    v, a = synthetic_step_inputs(cfg, f, h, w, 24.0, dev, dtype, seed=1)
    res["video_tokens"] = v.latent.shape[1]

    def run(label: str, **kw) -> None:
        reset_peak()
        model = build_transformer(cfg, device=dev, dtype=dtype, seed=0, **kw)
        weights = allocated_gib()
        compiled = args.compile and (label != "bf16" or args.compile_bf16)
        if compiled:
            from ltx2_tp.compile import compile_blocks

            compile_blocks(model)
        reset_peak()
        times = cuda_time(lambda: model(v, a), 2 if compiled else 1, args.repeat)
        out = [t.float().cpu() for t in model(v, a)]
        r = {"s_per_step": median(times), "times": times, "peak_gib": peak_gib(), "weights_gib": weights,
             "compiled": compiled, "linears": describe(model)}
        if label == "bf16":
            res["bf16_out"] = out
            res["input_amax"] = {k: t.cpu() for k, t in calibrate_input_amax(model, lambda: model(v, a)).items()}
        else:
            ref = res["bf16_out"]
            r.update(rel_err_video=rel(out[0], ref[0]), rel_err_audio=rel(out[1], ref[1]) if out[1] is not None else None,
                     speedup_vs_bf16=res["runs"]["bf16"]["s_per_step"] / r["s_per_step"])
        res["runs"][label] = r
        err = f", rel err video {r['rel_err_video']:.2e} audio {r['rel_err_audio']:.2e}" if label != "bf16" else ""
        print(f"{label}: {r['s_per_step']:.3f} s/step, peak {r['peak_gib']:.1f} GiB, weights {weights:.1f} GiB{err} "
              f"[{r['linears']}]", flush=True)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    run("bf16")
    for s in args.storages.split(","):
        if s not in STORAGES:
            raise SystemExit(f"--storages: unknown {s!r}; allowed: {', '.join(STORAGES)}")
        if s == "fp8-scaled-mm-static":
            amax = {k: t.to(dev) for k, t in res["input_amax"].items()}
            run(s, quantization="fp8-scaled-mm", input_amax=amax)
        else:
            run(s, quantization=s)
    if args.gemm:
        res["qkv_gemm"] = bench_gemm(v.latent.shape[1], cfg.inner_dim, dev, args.repeat)
    _sync()

    print(f"\n{name} | {res['date']} | torch {torch.__version__} | {args.model} ({cfg.num_layers} blocks) {args.case}, "
          f"{res['video_tokens']} video tokens")
    print("| storage | compiled | s/step | vs bf16 | peak GiB | weights GiB | rel err video | rel err audio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in res["runs"].items():
        e = (lambda k: f"{r[k]:.2e}" if r.get(k) is not None else "-")
        print(f"| {label} | {'yes' if r['compiled'] else 'no'} | {r['s_per_step']:.3f} | "
              f"{r.get('speedup_vs_bf16', 1.0):.2f}x | {r['peak_gib']:.1f} | "
              f"{r['weights_gib']:.1f} | {e('rel_err_video')} | {e('rel_err_audio')} |")
    del res["bf16_out"], res["input_amax"]
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
