"""Speed-up of the opt-in approximations on one GPU (their quality cost: benchmark/quality.py).

(a) temporal-window attention: one DiT step (random weights, bf16, T2V inputs) at each --cases
    size, exact and with each window radius K, with --layers blocks (4 by default: the blocks are
    identical, so a step of the 48-block model takes ~48/layers times as long; the table shows
    that scaled figure too). Also the windowed step's output against the exact one.
(b) keyframe stride and (c) step cache: their speed-up is the DiT work they leave out, so one
    two-stage request (--pipeline-size, --pipeline-steps stage-1 steps with the model's official
    guidance, real-size VAE / upsampler, random weights, no text encoder, no decode) is run exact
    and with each stride / threshold: denoising time, DiT passes and the video tokens they carried.
    On random weights the step-cache indicator is not a real model's, so T=1 (every step that may be
    skipped is) is the upper bound; what a real threshold skips, quality.py reports on the weights.

    python benchmark/bench_approx.py --out benchmark/results/bench_approx_h100_<date>.json     (<= 4 min, H100)
    python benchmark/bench_approx.py --device cpu --model tiny --cases 256x128x41 --layers 2 \
        --pipeline-model tiny --pipeline-size 128x128x33 --pipeline-steps 4                    (CPU smoke run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from common import case_tokens, rel  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeat: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times), out


def window_steps(a, device, dtype) -> list[dict]:
    """(a): one DiT step per case, exact and windowed."""
    from ltx2_tp.layers.windowed_attention import temporal_window
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.models.ltx2.weights import build_model
    from ltx2_tp.step_inputs import synthetic_step_inputs

    cfg = get_config(a.model, num_layers=a.layers)
    model = build_model(cfg, device=device, dtype=dtype, seed=0)
    rows = []
    for case in a.cases.split(","):
        w, h, f = (int(x) for x in case.split("x"))
        video, audio = synthetic_step_inputs(cfg, f, h, w, 24.0, device, dtype)
        tokens, _ = case_tokens(w, h, f)
        plan = model.execution_plan(tokens)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        exact_s, exact = timed(lambda: model(video, audio, plan=plan), device, a.warmup, a.repeat)
        exact = exact[0].float().cpu()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        rows.append(dict(case=case, tokens=tokens, variant="exact", s=exact_s, speedup=1.0, peak_gib=peak,
                         s_48=exact_s * 48 / a.layers, attn_share=1.0))
        print(f"{case} exact: {exact_s:.3f} s (x{48 / a.layers:g}: {exact_s * 48 / a.layers:.1f} s), peak {peak:.1f} GiB",
              flush=True)
        for k in (int(x) for x in a.windows.split(",")):
            wplan = replace(plan, attention_window_frames=k)
            win = temporal_window(video.positions, video.timesteps, k)
            seen = sum(min(win.frames, i + k + 1) - max(0, i - k) for i in range(win.frames)) / win.frames ** 2
            s, out = timed(lambda: model(video, audio, plan=wplan), device, a.warmup, a.repeat)
            rows.append(dict(case=case, tokens=tokens, variant=f"window K={k}", s=s, speedup=exact_s / s,
                             s_48=s * 48 / a.layers, attn_share=seen, rel_err=rel(out[0], exact)))
            print(f"{case} window K={k}: {s:.3f} s, {exact_s / s:.2f}x (keys seen {seen:.1%} of dense), "
                  f"one-step rel. max error vs exact {rows[-1]['rel_err']:.2e}", flush=True)
        del video, audio
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def pipeline_runs(a, device, dtype) -> list[dict]:
    """(b), (c): one request exact, strided, cached: denoising time and the DiT work it carried."""
    from ltx2_tp.distributed.context import SINGLE
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.request import GenerationRequest

    if a.pipeline_model == "tiny":
        from ltx2_tp.pipelines.tiny import build_tiny_components

        comps = build_tiny_components(0, device=device, dtype=dtype)
    else:
        from bench_request import build_full_size

        comps = build_full_size(a.pipeline_model, device, dtype, SINGLE, layers=a.pipeline_layers)
    pipe = get_pipeline_class("LTX2TwoStagePipeline")(comps)
    w, h, f = (int(x) for x in a.pipeline_size.split("x"))
    work = {"passes": 0, "tokens": 0}

    def count(_m, args):
        m = args[0] if args[0] is not None else args[1]
        work["passes"] += m.latent.shape[0]
        work["tokens"] += m.latent.shape[0] * (args[0].latent.shape[1] if args[0] is not None else 0)

    comps.transformer.register_forward_pre_hook(count)
    variants = [("exact", {})] + [(f"stride S={s}", {"keyframe_stride": s}) for s in _ints(a.strides)]
    variants += [(f"step cache T={t:g}", {"step_cache_threshold": t}) for t in _floats(a.thresholds)]
    rows, base = [], None

    def request(fields):
        return GenerationRequest(prompt="a fox", width=w, height=h, num_frames=f, num_inference_steps=a.pipeline_steps,
                                 seed=0, **fields)

    for _ in range(a.warmup):
        pipe.run_latents(request({}))
    for name, fields in variants:
        work.update(passes=0, tokens=0)
        _sync(device)
        t = time.perf_counter()
        run, video, _ = pipe.run_latents(request(fields))
        _sync(device)
        total = time.perf_counter() - t
        st = run.timer.times
        denoise = st.get("stage1_denoise", 0.0) + st.get("stage2_refine", 0.0)
        row = dict(variant=name, request_s=total, denoise_s=denoise, stage1_s=st.get("stage1_denoise", 0.0),
                   stage2_s=st.get("stage2_refine", 0.0), dit_passes=work["passes"], video_token_passes=work["tokens"],
                   approximations={k: _plain(v) for k, v in run.approximations.items()})
        if base is None:
            base = row
        else:
            row.update(speedup=base["denoise_s"] / denoise, passes_saved=1 - work["passes"] / base["dit_passes"],
                       token_passes_saved=1 - work["tokens"] / base["video_token_passes"],
                       video_rel_l2=float((video.double() - base_video.double()).norm() / base_video.double().norm()))
        if name == "exact":
            base_video = video
        rows.append(row)
        print(f"{a.pipeline_size} {name}: denoise {denoise:.3f} s (stage 1 {row['stage1_s']:.3f}, stage 2 "
              f"{row['stage2_s']:.3f}), {work['passes']} DiT passes, {work['tokens']} video token-passes", flush=True)
    return rows


def _plain(v):
    return {k: (_plain(x) if isinstance(x, dict) else x) for k, x in v.items()} if isinstance(v, dict) else v


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ltx-2-19b", help="(a): the DiT's preset")
    p.add_argument("--cases", default="1920x1088x481,1920x1088x1441")
    p.add_argument("--layers", type=int, default=4, help="(a): blocks (a step scales with them: x48/layers)")
    p.add_argument("--windows", default="2,4", help="(a): window radii K (latent frames each way)")
    p.add_argument("--pipeline-model", default="ltx-2-19b", help="(b), (c): the DiT's preset (tiny: the tiny world)")
    p.add_argument("--pipeline-layers", type=int, default=None, help="(b), (c): fewer blocks (default: all)")
    p.add_argument("--pipeline-size", default="768x512x121")
    p.add_argument("--pipeline-steps", type=int, default=8, help="(b), (c): stage-1 steps (stage 2 has its 3)")
    p.add_argument("--strides", default="2,3")
    p.add_argument("--thresholds", default="0.05,1")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: window, pipeline")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    window = [] if "window" in a.skip else window_steps(a, device, dtype)
    pipe = [] if "pipeline" in a.skip else pipeline_runs(a, device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name}, bf16, random weights, {time.perf_counter() - t0:.0f} s in all")
    if window:
        print(f"\n(a) temporal-window attention: one DiT step, {a.model} with {a.layers} blocks (x{48 / a.layers:g}: "
              "48 blocks)\n| case | tokens | variant | s/step | x48 blocks s | speed-up | keys seen | rel. max err |")
        print("|---|---|---|---|---|---|---|---|")
        for r in window:
            err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
            print(f"| {r['case']} | {r['tokens']:,} | {r['variant']} | {r['s']:.3f} | {r['s_48']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['attn_share']:.1%} | {err} |")
    if pipe:
        print(f"\n(b), (c): LTX2TwoStagePipeline {a.pipeline_size}, {a.pipeline_steps} + 3 steps, {a.pipeline_model}"
              f"{'' if a.pipeline_layers is None else f' ({a.pipeline_layers} blocks)'}, to the final latents")
        print("| variant | denoise s | speed-up | DiT passes | passes saved | video token-passes saved | latent rel. L2 |")
        print("|---|---|---|---|---|---|---|")
        for r in pipe:
            print(f"| {r['variant']} | {r['denoise_s']:.3f} | {r.get('speedup', 1.0):.2f}x | {r['dit_passes']} | "
                  f"{r.get('passes_saved', 0.0):.1%} | {r.get('token_passes_saved', 0.0):.1%} | "
                  f"{r.get('video_rel_l2', 0.0):.3e} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "device": name,
                                           "torch": torch.__version__, "command": " ".join(sys.argv),
                                           "window": window, "pipeline": pipe}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
