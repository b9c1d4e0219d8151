"""One DiT step (one denoising forward), ours vs Lightricks' ltx-core LTXModel, same weights, same process.

  python benchmark/bench_dit.py --cases 768x512x121,1920x1088x121,1920x1088x481 --out benchmark/results/x.json

Order (two 35 GiB models do not fit one H100 together): ltx-core is built (meta device, random
weights on the GPU), timed eager (and compiled per block with --compile-ref), profiled; its weights
move to host memory and it is freed; ours is built from those exact weights, timed, profiled, and
its outputs are compared with ltx-core's (bf16, relative max error).
Reports s/step (median), peak GiB, achieved TFLOP/s (common.step_flops) and the ratios.
--resident-blocks K times each of ours' runs again with the blocks not kept resident streamed from
pinned host memory (memory/swap.py; benchmark/bench_swap.py does this without ltx-core), and
--memory-fraction F caps the process (torch.cuda.set_per_process_memory_fraction; ltx-core too).

--max-gpu-memory 24GiB runs ours alone under the planner (memory/planner.py; ltx-core's whole
model does not fit such a cap): per case the plan of one unguided step at that size (layout 1 GPU,
resident blocks, activation plan), the transformer built with that resident set and PlanRule under
the hard cap (set_per_process_memory_fraction(cap / total) before building), then s/step and
predicted vs measured peak (max_memory_allocated). With --layers L it also prints the prediction
for the full depth (activations do not depend on depth; weights: more streamed blocks at 48).
--chunk-rule 2 runs (and predicts) LTX2LongVideo's fixed 2 GiB chunk rule instead: what long-video
auto plans one piece with when no cap is given (a large cap stands for the whole GPU).

  python benchmark/bench_dit.py --max-gpu-memory 24GiB --cases 1920x1088x121 --repeat 2 --out x.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_sync, build_ltx_core_gpu, case_tokens, peak_gib, rel, reset_peak, cuda_time, kernel_summary,  # noqa: E402
                    median, run_ltx_core, step_flops, summary_markdown, write_json)

from ltx2_tp.memory.plan import ExecutionPlan  # noqa: E402
from ltx2_tp.memory.swap import disable_block_swap, enable_block_swap, spread_blocks  # noqa: E402
from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.models.ltx2.weights import build_model  # noqa: E402
from ltx2_tp.pipelines.planning import cap_fraction  # noqa: E402
from ltx2_tp.step_inputs import synthetic_step_inputs  # noqa: E402


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
    plan = ExecutionPlan(ffn_chunk_tokens=args.chunk_check, attn_chunk_tokens=args.chunk_check)
    times = cuda_time(lambda: model(v, a, plan=plan), 2 if kind == "compiled" else 1, args.repeat)
    ov, oa = model(v, a, plan=plan)
    chunked = plan.describe()
    base = r[f"ours_{kind}_s"]
    r[f"ours_{kind}_chunked_s"] = median(times)
    r[f"chunked_{kind}_vs_unchunked"] = median(times) / base
    r[f"chunked_{kind}_rel_err_video"] = rel(ov, unchunked_out[0])
    print(f"ours {kind} chunked [{chunked}]: {median(times):.3f} s/step, "
          f"{median(times) / base:.3f}x the unchunked time, rel err vs unchunked {r[f'chunked_{kind}_rel_err_video']:.1e}",
          flush=True)


def swap_check(model, inputs, cases, kind: str, resident_out: dict, results: dict, args) -> None:
    """Time the same steps with blocks streamed from pinned host memory (--resident-blocks), against
    the resident `kind` run: ratio, peak, and bit-equality of the output (the same kernels read the
    same bytes)."""
    k = args.resident_blocks
    n = len(model.transformer_blocks)
    swap = enable_block_swap(model, spread_blocks(int(k[:-1]), n) if k.endswith("s") else int(k))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for w, h, f in cases:
        v, a = inputs(w, h, f)
        model.plan = plan_for(v.latent.shape[1], model.cfg.inner_dim) if args.plan == "auto" else ExecutionPlan()
        reset_peak()
        times = cuda_time(lambda: model(v, a), 2 if args.compile and kind != "eager" else 1, args.repeat)
        out = [t.float().cpu() for t in model(v, a)]
        r = results["cases"][f"{w}x{h}x{f}"]
        base = r[f"ours_{kind}_s"]
        r.update({f"ours_{kind}_swap_s": median(times), f"{kind}_swap_vs_resident": median(times) / base,
                  f"ours_{kind}_swap_peak_gib": peak_gib(), f"{kind}_swap_streamed_blocks": len(swap.streamed),
                  f"{kind}_swap_bit_equal": all(torch.equal(o, q) for o, q in zip(out, resident_out[(kind, w, h, f)]))})
        print(f"ours {kind} with {len(swap.streamed)} of {n} blocks streamed {w}x{h}x{f}: {median(times):.3f} s/step, "
              f"{median(times) / base:.3f}x resident, peak {peak_gib():.1f} GiB, "
              f"bit-equal to resident {r[f'{kind}_swap_bit_equal']}", flush=True)
        del v, a
    disable_block_swap(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--cases", default="768x512x121,1920x1088x121")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile-ref", action="store_true", help="also time ltx-core with each block compiled")
    ap.add_argument("--compile", action="store_true", help="also time ours with each block compiled")
    ap.add_argument("--fp8", action="store_true", help="then time ours with fp8 linears (compiled if --compile), "
                    "with its error vs ltx-core's bf16 output")
    ap.add_argument("--quantization", default=None, choices=["fp8-rowwise", "fp8-scaled-mm", "fp8-cast"],
                    help="the storage the --fp8 runs use (default fp8-rowwise; implies --fp8): converted in place "
                         "from the bf16 weights (models/ltx2/quantization.py; fp8-scaled-mm: dynamic activation "
                         "scales); benchmark/bench_quant.py compares them all without ltx-core")
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
    ap.add_argument("--resident-blocks", default=None, metavar="K",
                    help="after each of ours' runs (eager, compiled, fp8), time it again with blocks streamed from "
                         "pinned host memory: K first blocks resident, Ks K spread evenly, 0 every block streamed")
    ap.add_argument("--memory-fraction", type=float, default=None, metavar="F",
                    help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                    help="e.g. 24GiB: ours alone under the planner's plan and a hard cap (module docstring)")
    ap.add_argument("--capped-warmup", type=int, default=1, metavar="N",
                    help="with --max-gpu-memory: untimed steps first (0: time the first step; a 48-block 1441-frame "
                         "step takes ~210 s, so warm-up + step does not fit one 600 s device call)")
    ap.add_argument("--chunk-rule", type=float, default=None, metavar="GIB",
                    help="with --max-gpu-memory: run LTX2LongVideo's fixed chunk rule (PlanRule(budget_bytes=GIB), "
                         "what long-video auto plans with when no cap is given) instead of the planner's plans")
    args = ap.parse_args()
    args.fp8 = args.fp8 or args.quantization is not None
    if args.max_gpu_memory is not None:
        for flag, bad in (("--memory-fraction", args.memory_fraction is not None), ("--compile-ref", args.compile_ref),
                          ("--chunk-check", args.chunk_check), ("--plan none", args.plan == "none")):
            if bad:
                ap.error(f"--max-gpu-memory runs the planner's plan under its own cap; {flag} does not apply")
        if args.resident_blocks not in (None, "auto") and not args.resident_blocks.isdigit():
            ap.error("--max-gpu-memory takes --resident-blocks K (an integer) or auto")
        return capped(args)

    dev = torch.device(args.device)
    if args.memory_fraction is not None and dev.type == "cuda":
        cap_fraction(args.memory_fraction, dev)
    dtype = torch.bfloat16
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    cases = [parse_case(c) for c in args.cases.split(",")]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    stamp = f"{name} | {datetime.date.today()} | torch {torch.__version__}"
    cmd = "python " + " ".join(sys.argv)
    results = {"device": name, "date": str(datetime.date.today()), "command": cmd,
               "torch": torch.__version__, "model": args.model, "memory_fraction": args.memory_fraction, "cases": {}}
    ours_out = {}  # (kind, w, h, f) -> ours' resident output, for --resident-blocks

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
        r["tokens"], r["audio_tokens"] = case_tokens(w, h, f)
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

    def plan_of(v):  # auto: what the model derives by itself for these tokens
        return model.execution_plan(v.latent.shape[1]) if args.plan == "auto" else ExecutionPlan()

    for w, h, f in cases:
        v, a = inputs(w, h, f)
        plan = plan_of(v)
        reset_peak()
        times = cuda_time(lambda: model(v, a, plan=plan), 1, args.repeat)
        ov, oa = model(v, a, plan=plan)
        rv, ra = ref_out[(w, h, f)]
        r = results["cases"][f"{w}x{h}x{f}"]
        r.update(ours_eager_s=median(times), ours_peak_gib=peak_gib(),
                 plan=plan.describe(), rel_err_video_vs_ltx_core=rel(ov, rv), rel_err_audio_vs_ltx_core=rel(oa, ra))
        print(f"ours eager {w}x{h}x{f}: {median(times):.3f} s/step [{plan.describe()}] "
              f"rel err video {r['rel_err_video_vs_ltx_core']:.2e} audio {r['rel_err_audio_vs_ltx_core']:.2e}", flush=True)
        ours_out[("eager", w, h, f)] = [ov.float().cpu(), oa.float().cpu()]
        if args.chunk_check:
            chunk_check(model, v, a, (ov, oa), r, "eager", args)
        if args.profile_case == f"{w}x{h}x{f}":
            profile_step(lambda: model(v, a, plan=plan), Path(args.profile_dir) / f"ours_eager_{w}x{h}x{f}.md",
                         f"ltx2_tp eager, one DiT step {w}x{h}x{f}", f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")
        del v, a
    if args.resident_blocks is not None:
        swap_check(model, inputs, cases, "eager", ours_out, results, args)
    if args.compile and not args.fp8_first:
        from ltx2_tp.compile import compile_blocks

        compile_blocks(model)
        for w, h, f in cases:
            v, a = inputs(w, h, f)
            plan = plan_of(v)
            reset_peak()
            times = cuda_time(lambda: model(v, a, plan=plan), 2, args.repeat)
            r = results["cases"][f"{w}x{h}x{f}"]
            r.update(ours_compiled_s=median(times), ours_compiled_peak_gib=peak_gib())
            print(f"ours compiled {w}x{h}x{f}: {median(times):.3f} s/step", flush=True)
            if args.resident_blocks is not None:
                ours_out[("compiled", w, h, f)] = [t.float().cpu() for t in model(v, a)]
            if args.chunk_check:
                chunk_check(model, v, a, model(v, a, plan=plan), r, "compiled", args)
            if args.profile_case == f"{w}x{h}x{f}":
                profile_step(lambda: model(v, a, plan=plan), Path(args.profile_dir) / f"ours_compiled_{w}x{h}x{f}.md",
                             f"ltx2_tp compiled blocks, one DiT step {w}x{h}x{f}",
                             f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")
        if args.resident_blocks is not None:
            swap_check(model, inputs, cases, "compiled", ours_out, results, args)

    if args.fp8:  # after bf16: same model, its block linears quantized in place
        from ltx2_tp.models.ltx2.quantization import quantize_model

        n = quantize_model(model, args.quantization or "fp8-rowwise")
        results["quantization"] = args.quantization or "fp8-rowwise"
        if args.compile and args.fp8_first:
            from ltx2_tp.compile import compile_blocks

            compile_blocks(model)
        gc.collect()
        torch.cuda.empty_cache()
        for w, h, f in cases:
            v, a = inputs(w, h, f)
            plan = plan_of(v)
            reset_peak()
            times = cuda_time(lambda: model(v, a, plan=plan), 2 if args.compile else 1, args.repeat)
            ov, oa = model(v, a, plan=plan)
            rv, ra = ref_out[(w, h, f)]
            r = results["cases"][f"{w}x{h}x{f}"]
            r.update(ours_fp8_s=median(times), ours_fp8_peak_gib=peak_gib(), fp8_linears=n,
                     fp8_rel_err_video_vs_ltx_core=rel(ov, rv), fp8_rel_err_audio_vs_ltx_core=rel(oa, ra))
            ours_out[("fp8", w, h, f)] = [ov.float().cpu(), oa.float().cpu()]
            r["fp8_speedup_vs_eager"] = r["ltx_core_eager_s"] / r["ours_fp8_s"]
            if r.get("ltx_core_compiled_s"):
                r["fp8_speedup_vs_compiled"] = r["ltx_core_compiled_s"] / r["ours_fp8_s"]
            print(f"ours fp8{' compiled' if args.compile else ''} {w}x{h}x{f}: {median(times):.3f} s/step "
                  f"({r['fp8_speedup_vs_eager']:.2f}x ltx-core eager, "
                  f"{r.get('fp8_speedup_vs_compiled') or float('nan'):.2f}x compiled), peak {peak_gib():.1f} GiB, "
                  f"rel err vs ltx-core bf16: video {r['fp8_rel_err_video_vs_ltx_core']:.2e} "
                  f"audio {r['fp8_rel_err_audio_vs_ltx_core']:.2e}", flush=True)
            if args.profile_case == f"{w}x{h}x{f}":
                profile_step(lambda: model(v, a, plan=plan), Path(args.profile_dir) / f"ours_fp8_{w}x{h}x{f}.md",
                             f"ltx2_tp fp8 linears, one DiT step {w}x{h}x{f}", f"torch.profiler (CUPTI) | {stamp} | `{cmd}`")
            del v, a
        if args.resident_blocks is not None:
            swap_check(model, inputs, cases, "fp8", ours_out, results, args)

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


def capped(args) -> None:
    """--max-gpu-memory: the planner's plan of each case, run under the hard cap."""
    from ltx2_tp.memory.planner import Layout, PlanError, gib, parse_bytes, plan_request
    from ltx2_tp.models.ltx2.quantization import build_transformer

    try:
        cap = parse_bytes(args.max_gpu_memory)
    except ValueError as e:
        sys.exit(f"bench_dit.py: error: {e}")
    dev = torch.device(args.device)
    dtype = torch.bfloat16
    full = get_config(args.model)
    cfg = full.replace(num_layers=args.layers) if args.layers else full
    storage = args.quantization or ("fp8-rowwise" if args.fp8 else "bf16")
    k = None if args.resident_blocks in (None, "auto") else int(args.resident_blocks)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    results = {"device": name, "date": str(datetime.date.today()), "command": "python " + " ".join(sys.argv),
               "torch": torch.__version__, "model": args.model, "layers": cfg.num_layers, "storage": storage,
               "max_gpu_memory_bytes": cap, "cases": {}}
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        if cap > total:
            sys.exit(f"bench_dit.py: error: --max-gpu-memory {gib(cap)} is more than this GPU has ({gib(total)})")
        from ltx2_tp.pipelines.planning import hard_cap

        hard_cap(cap, dev)  # the build runs under it too
    from ltx2_tp.layers.attention_backend import set_attention_backend

    set_attention_backend(args.attention)
    # one unguided DiT step as the synthetic inputs have it: 256 text tokens, one timestep per sample
    kw = dict(max_gpu_memory_bytes=cap, two_stage=False, guided=False, storage=storage, layout=Layout(),
              text_tokens=256, per_token_timesteps=False)
    if args.chunk_rule is not None:  # the pipeline's own rule: the planner counts its plans (memory/planner.py)
        from ltx2_tp.memory.plan import PlanRule

        kw["plan_rule"] = PlanRule(budget_bytes=args.chunk_rule * 2**30)
        results["chunk_rule_gib"] = args.chunk_rule
    rows = []
    for w, h, f in cases_of(args):
        try:
            plan = plan_request(cfg, width=w, height=h, num_frames=f, resident_blocks=k, **kw)
        except PlanError as e:
            print(f"{w}x{h}x{f}: does not fit: {e}", flush=True)
            results["cases"][f"{w}x{h}x{f}"] = {"fits": False, "error": str(e)}
            continue
        step = plan.dit_phases[0]
        r = {"fits": True, "resident_blocks": plan.resident_blocks, "streamed_blocks": plan.streamed_blocks,
             "plan": step.plan.describe(), "predicted_peak_gib": plan.peak / 2**30,
             "predicted_weights_gib": step.weights / 2**30, "predicted_activations_gib": step.activations / 2**30}
        if args.layers:
            try:
                fp = plan_request(full, width=w, height=h, num_frames=f, **kw)
                r.update(full_depth_predicted_peak_gib=fp.peak / 2**30, full_depth_resident_blocks=fp.resident_blocks)
            except PlanError as e:
                r["full_depth_error"] = str(e)
        t0 = time.perf_counter()
        model = build_transformer(cfg, device=dev, dtype=dtype, seed=0, plan_rule=kw.get("plan_rule", plan.plan_rule()),
                                  quantization=None if storage == "bf16" else storage,
                                  resident_blocks=plan.resident_blocks if plan.streamed_blocks else None)
        r["build_s"] = time.perf_counter() - t0
        v, a = synthetic_step_inputs(cfg, f, h, w, 24.0, dev, dtype, seed=1)
        assert model.execution_plan(v.latent.shape[1], a.latent.shape[1], 256, per_token_timesteps=False) == step.plan
        reset_peak()
        times = cuda_time(lambda: model(v, a), args.capped_warmup, args.repeat)
        r.update(s_per_step=median(times), hard_cap=dev.type == "cuda", warmup=args.capped_warmup)
        if dev.type == "cuda":
            r["measured_peak_gib"] = peak_gib()
            r["measured_over_predicted"] = r["measured_peak_gib"] / r["predicted_peak_gib"]
        results["cases"][f"{w}x{h}x{f}"] = r
        rows.append((f"{w}x{h}x{f}", r))
        print(f"{w}x{h}x{f}: {r['s_per_step']:.3f} s/step, {plan.resident_blocks} resident / {plan.streamed_blocks} "
              f"streamed, [{r['plan']}], predicted {r['predicted_peak_gib']:.2f} GiB, measured "
              f"{r.get('measured_peak_gib', float('nan')):.2f} GiB", flush=True)
        del model, v, a
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{name} | {datetime.date.today()} | {args.model} {cfg.num_layers} blocks {storage} | cap {gib(cap)} "
          f"(hard: {dev.type == 'cuda'})")
    print("| case | resident/streamed | s/step | predicted GiB | measured GiB | measured/predicted | 48-block predicted |")
    for c, r in rows:
        print(f"| {c} | {r['resident_blocks']}/{r['streamed_blocks']} | {r['s_per_step']:.3f} | "
              f"{r['predicted_peak_gib']:.2f} | {r.get('measured_peak_gib', float('nan')):.2f} | "
              f"{r.get('measured_over_predicted', float('nan')):.3f} | "
              f"{r.get('full_depth_predicted_peak_gib', r['predicted_peak_gib']):.2f} |")
    if args.out:
        write_json(args.out, results)


def cases_of(args):
    return [parse_case(c) for c in args.cases.split(",")]


if __name__ == "__main__":
    main()
