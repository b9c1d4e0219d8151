"""One DiT step (one denoising forward), ours vs Lightricks' ltx-core LTXModel, same weights, same process.

  python benchmark/bench_dit.py --cases 768x512x121,1920x1088x121,1920x1088x481 --out benchmark/results/x.json

Order (two 35 GiB models do not fit one H100 together): ltx-core is built (meta device, random
weights on the GPU), timed eager (and compiled per block with --compile-ref), profiled; its weights
move to host memory and it is freed; ours is built from those exact weights, timed, profiled, and
its outputs are compared with ltx-core's (bf16, relative max error).
Reports s/step (median), peak GiB, achieved TFLOP/s (common.step_flops) and the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_sync, build_ltx_core_gpu, peak_gib, rel, reset_peak, cuda_time, kernel_summary, median, run_ltx_core, step_flops,  # noqa: E402
                    summary_markdown, write_json)

from ltx2_tp.memory.plan import ExecutionPlan, plan_for  # noqa: E402
from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.models.ltx2.weights import build_model  # noqa: E402
from ltx2_tp.step_inputs import audio_tokens_for, synthetic_step_inputs  # noqa: E402


def parse_case(s: str):
    w, h, f = (int(x) for x in s.lower().split("x"))
    return w, h, f


def profile_step(fn, path: Path, title: str, header: str):
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        _sync()
    s = kernel_summary(prof)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary_markdown(title, header, s))
    return s


def chunk_check(model, v, a, unchunked_out, r: dict, kind: str, args) -> None:
    """Time the same step with FFN and attention forced into chunks of --chunk-check tokens."""
    plan = model.plan
    model.plan = ExecutionPlan(ffn_chunk_tokens=args.chunk_check, attn_chunk_tokens=args.chunk_check)
    times = cuda_time(lambda: model(v, a), 2 if kind == "compiled" else 1, args.repeat)
    ov, oa = model(v, a)
    chunked, model.plan = model.plan.describe(), plan
    base = r[f"ours_{kind}_s"]
    r[f"ours_{kind}_chunked_s"] = median(times)
    r[f"chunked_{kind}_vs_unchunked"] = median(times) / base
    r[f"chunked_{kind}_rel_err_video"] = rel(ov, unchunked_out[0])
    print(f"ours {kind} chunked [{chunked}]: {median(times):.3f} s/step, "
          f"{median(times) / base:.3f}x the unchunked time, rel err vs unchunked {r[f'chunked_{kind}_rel_err_video']:.1e}",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--cases", default="768x512x121,1920x1088x121")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile-ref", action="store_true", help="also time ltx-core with each block compiled")
    ap.add_argument("--compile", action="store_true", help="also time ours with each block compiled")
    ap.add_argument("--fp8", action="store_true", help="then time ours with fp8 linears (compiled if --compile), "
                    "with its error vs ltx-core's bf16 output")
    ap.add_argument("--fp8-first", action="store_true", help="with --compile --fp8: quantize before compiling, "
                    "so only the fp8 graphs are compiled (skips the compiled bf16 timing; saves a compilation)")
    ap.add_argument("--attention", default="auto", help="attention backend of ours (ltx-core keeps its SDPA): "
                    "e.g. fp8 / int8_fp8, whose error vs ltx-core's bf16 output then shows in rel_err_video")
    ap.add_argument("--plan", default="auto", choices=["auto", "none"])
    ap.add_argument("--chunk-check", type=int, default=None, metavar="TOKENS",
                    help="also time ours (eager, and compiled with --compile) with FFN and attention forced into "
                         "chunks of TOKENS, against the unchunked plan (the chunked-within-5%% check)")
    ap.add_argument("--profile-case", default=None, help="WxHxF to profile with torch.profiler")
    ap.add_argument("--profile-dir", default="profiles")
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (quick checks)")
    ap.add_argument("--device", default="cuda", help="cpu only for smoke tests of this script (with --model tiny)")
    args = ap.parse_args()

    dev = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    cases = [parse_case(c) for c in args.cases.split(",")]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    stamp = f"{name} | {datetime.date.today()} | torch {torch.__version__}"
    cmd = "python " + " ".join(sys.argv)
    results = {"device": name, "date": str(datetime.date.today()), "command": cmd,
               "torch": torch.__version__, "model": args.model, "cases": {}}

    def inputs(w, h, f):
        return synthetic_step_inputs(cfg, f, h, w, 24.0, dev, dtype, seed=1)

    # ---- ltx-core --------------------------------------------------------------------------
    ref = build_ltx_core_gpu(cfg, dev, dtype, seed=0)
    ref_out = {}
    for w, h, f in cases:
        v, a = inputs(w, h, f)
        reset_peak()
        times = cuda_time(lambda: run_ltx_core(ref, v, a), 1, args.repeat)
        ref_out[(w, h, f)] = [t.float().cpu() for t in run_ltx_core(ref, v, a)]
        r = results["cases"].setdefault(f"{w}x{h}x{f}", {})
        r["tokens"] = v.latent.shape[1]
        r["audio_tokens"] = audio_tokens_for(f, 24.0)
        r["flops"] = step_flops(cfg, r["tokens"], r["audio_tokens"])
        r["ltx_core_eager_s"] = median(times)
        r["ltx_core_eager_peak_gib"] = peak_gib()
        print(f"ltx-core eager {w}x{h}x{f}: {median(times):.3f} s/step", flush=True)
        if args.profile_case == f"{w}x{h}x{f}":
            profile_step(lambda: run_ltx_core(ref, v, a), Path(args.profile_dir) / f"ltx_core_eager_{w}x{h}x{f}.md",
                         f"ltx-core eager, one DiT step {w}x{h}x{f}", f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")
        del v, a
    if args.compile_ref:
        from torch import _dynamo

        _dynamo.config.allow_unspec_int_on_nn_module = True
        _dynamo.config.cache_size_limit = 256
        for b in ref.transformer_blocks:
            b.compile()
        for w, h, f in cases:
            v, a = inputs(w, h, f)
            times = cuda_time(lambda: run_ltx_core(ref, v, a), 2, args.repeat)
            results["cases"][f"{w}x{h}x{f}"]["ltx_core_compiled_s"] = median(times)
            print(f"ltx-core compiled {w}x{h}x{f}: {median(times):.3f} s/step", flush=True)
    sd = {k: t.detach().to("cpu") for k, t in ref.state_dict().items()}
    del ref
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # ---- ours ------------------------------------------------------------------------------
    from ltx2_tp.layers.attention_backend import set_attention_backend

    set_attention_backend(args.attention)
    results["attention"] = args.attention
    model = build_model(cfg, device=dev, dtype=dtype, state_dict=sd)
    del sd
    for w, h, f in cases:
        v, a = inputs(w, h, f)
        model.plan = plan_for(v.latent.shape[1], cfg.inner_dim) if args.plan == "auto" else ExecutionPlan()
        reset_peak()
        times = cuda_time(lambda: model(v, a), 1, args.repeat)
        ov, oa = model(v, a)
        rv, ra = ref_out[(w, h, f)]
        r = results["cases"][f"{w}x{h}x{f}"]
        r.update(ours_eager_s=median(times), ours_peak_gib=peak_gib(),
                 plan=model.plan.describe(), rel_err_video_vs_ltx_core=rel(ov, rv), rel_err_audio_vs_ltx_core=rel(oa, ra))
        print(f"ours eager {w}x{h}x{f}: {median(times):.3f} s/step [{model.plan.describe()}] "
              f"rel err video {r['rel_err_video_vs_ltx_core']:.2e} audio {r['rel_err_audio_vs_ltx_core']:.2e}", flush=True)
        if args.chunk_check:
            chunk_check(model, v, a, (ov, oa), r, "eager", args)
        if args.profile_case == f"{w}x{h}x{f}":
            profile_step(lambda: model(v, a), Path(args.profile_dir) / f"ours_eager_{w}x{h}x{f}.md",
                         f"ltx2_tp eager, one DiT step {w}x{h}x{f}", f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")
        del v, a
    if args.compile and not args.fp8_first:
        from ltx2_tp.compile import compile_blocks

        compile_blocks(model)
        for w, h, f in cases:
            v, a = inputs(w, h, f)
            model.plan = plan_for(v.latent.shape[1], cfg.inner_dim) if args.plan == "auto" else ExecutionPlan()
            reset_peak()
            times = cuda_time(lambda: model(v, a), 2, args.repeat)
            r = results["cases"][f"{w}x{h}x{f}"]
            r.update(ours_compiled_s=median(times), ours_compiled_peak_gib=peak_gib())
            print(f"ours compiled {w}x{h}x{f}: {median(times):.3f} s/step", flush=True)
            if args.chunk_check:
                chunk_check(model, v, a, model(v, a), r, "compiled", args)
            if args.profile_case == f"{w}x{h}x{f}":
                profile_step(lambda: model(v, a), Path(args.profile_dir) / f"ours_compiled_{w}x{h}x{f}.md",
                             f"ltx2_tp compiled blocks, one DiT step {w}x{h}x{f}",
                             f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")

    if args.fp8:  # after bf16: same model, its block linears quantized in place
        from ltx2_tp.layers.fp8 import quantize_fp8

        n = quantize_fp8(model)
        if args.compile and args.fp8_first:
            from ltx2_tp.compile import compile_blocks

            compile_blocks(model)
        gc.collect()
        torch.cuda.empty_cache()
        for w, h, f in cases:
            v, a = inputs(w, h, f)
            model.plan = plan_for(v.latent.shape[1], cfg.inner_dim) if args.plan == "auto" else ExecutionPlan()
            reset_peak()
            times = cuda_time(lambda: model(v, a), 2 if args.compile else 1, args.repeat)
            ov, oa = model(v, a)
            rv, ra = ref_out[(w, h, f)]
            r = results["cases"][f"{w}x{h}x{f}"]
            r.update(ours_fp8_s=median(times), ours_fp8_peak_gib=peak_gib(), fp8_linears=n,
                     fp8_rel_err_video_vs_ltx_core=rel(ov, rv), fp8_rel_err_audio_vs_ltx_core=rel(oa, ra))
            r["fp8_speedup_vs_eager"] = r["ltx_core_eager_s"] / r["ours_fp8_s"]
            if r.get("ltx_core_compiled_s"):
                r["fp8_speedup_vs_compiled"] = r["ltx_core_compiled_s"] / r["ours_fp8_s"]
            print(f"ours fp8{' compiled' if args.compile else ''} {w}x{h}x{f}: {median(times):.3f} s/step "
                  f"({r['fp8_speedup_vs_eager']:.2f}x ltx-core eager, "
                  f"{r.get('fp8_speedup_vs_compiled') or float('nan'):.2f}x compiled), peak {peak_gib():.1f} GiB, "
                  f"rel err vs ltx-core bf16: video {r['fp8_rel_err_video_vs_ltx_core']:.2e} "
                  f"audio {r['fp8_rel_err_audio_vs_ltx_core']:.2e}", flush=True)
            if args.profile_case == f"{w}x{h}x{f}":
                profile_step(lambda: model(v, a), Path(args.profile_dir) / f"ours_fp8_{w}x{h}x{f}.md",
                             f"ltx2_tp fp8 linears, one DiT step {w}x{h}x{f}", f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")
            del v, a

    # ---- table -----------------------------------------------------------------------------
    print(f"\n{stamp}\n| case | tokens | ltx-core eager s | ltx-core compiled s | ours s | ours compiled s | "
          "ours/eager | ours/compiled | TFLOP/s ours | peak GiB ref/ours |")
    for name, r in results["cases"].items():
        best = min(x for x in (r.get("ours_eager_s"), r.get("ours_compiled_s")) if x)
        rc = r.get("ltx_core_compiled_s")
        r["speedup_vs_eager"] = r["ltx_core_eager_s"] / best
        r["speedup_vs_compiled"] = rc / best if rc else None
        r["tflops_ours"] = r["flops"] / best / 1e12
        print(f"| {name} | {r['tokens']} | {r['ltx_core_eager_s']:.3f} | {rc or float('nan'):.3f} | "
              f"{r['ours_eager_s']:.3f} | {r.get('ours_compiled_s') or float('nan'):.3f} | {r['speedup_vs_eager']:.2f}x | "
              f"{(r['speedup_vs_compiled'] or float('nan')):.2f}x | {r['tflops_ours']:.0f} | "
              f"{r['ltx_core_eager_peak_gib']:.1f}/{r['ours_peak_gib']:.1f} |")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
