"""Whole requests, per stage and per step, in the shape of sglang PR's table (../shared/seeds/004)
and sglang's published baselines (../shared/anchors.md): 768x512x121, warm-up excluded.

Full-size DiT with seeded random weights (the speed does not depend on the values); video VAE,
upsampler, audio VAE and vocoder at the real LTX-2 sizes (configs below, from sglang's LTX-2
configs) with random weights; the Gemma text encoder is replaced by a fixed random context of
1024 tokens (text encoding is not timed: it is not our code); no distilled LoRA is fused (random
weights have none). Stage 1 runs the official multimodal guidance with the model's defaults
(ltx-pipelines' PipelineParams: LTX-2 40 steps, video cfg 3 + STG block 29 + modality 3, audio
cfg 7 ...: 4 DiT passes per step, one batched forward when this rank's video tokens <= 16,384);
`--guidance cfg` runs plain CFG on both streams instead (2 passes: the figures before issue 16).
Several pipelines run in one process over the same weights (`--pipeline-class-name A,B`).
`--official` then runs ltx-pipelines' own TI2VidTwoStagesPipeline on the same weights (shared, not
copied: benchmark/official_pipeline.py) with the same requests (seeds, guidance, steps) and prints
its stages beside ours and sglang's published figures (../shared/anchors.md); one rank only.
`--compile-cache-dir D` puts inductor's caches in D: a second run with the same D measures the
warm start (its warm-up request loads the compiled graphs instead of compiling them).

    python benchmark/bench_request.py --model ltx-2-19b --pipeline-class-name LTX2TwoStagePipeline,LTX2DistilledPipeline \
        --width 768 --height 512 --num-frames 121 --repeat 3 --json benchmark/results/x.json
    python benchmark/bench_request.py --model ltx-2.3 --steps 30 [--compile] [--guidance cfg]
    torchrun --nproc-per-node 4 benchmark/bench_request.py --tp-size 4 ...      (TP / SP layouts)
    python benchmark/bench_request.py --device cpu --model tiny --width 128 --height 128 --num-frames 9 --steps 2 \
        --pipeline-class-name LTX2TwoStagePipeline,LTX2DistilledPipeline --repeat 1 --official
    torchrun --nproc-per-node 2 benchmark/bench_request.py --enable-cfg-parallel ...   (2 guidance groups)

GPU time of `--official` at 768x512x121, LTX-2's 40 steps, eager, warm-up 1 + repeat 1 (estimated from
the 2026-11-23 eager runs: a pass at 1,536 tokens ~0.31 s eager, launch-bound): ours ~0.45 s/step
(4 passes batched) -> ~25 s a request; ltx-pipelines 4 forwards a step -> ~1.3 s/step -> ~60 s; the
distilled pipeline ~10 s; build ~30 s: ~4 minutes in all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ltx2_tp.compat import ensure_ltx_imports  # noqa: E402

ensure_ltx_imports()

# ltx-core configs at the sizes of the released LTX-2 VAE / audio VAE / vocoder
# (sglang configs/models/vaes/ltx_video.py, ltx_audio.py, vocoder/ltx_vocoder.py).
REAL_VAE = {"vae": {
    "latent_channels": 128, "patch_size": 4, "decoder_base_channels": 128, "timestep_conditioning": False,
    "causal_decoder": False,
    "decoder_blocks": [["res_x", {"num_layers": 5}], ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 5}], ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 5}], ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 5}]],
}}
REAL_AUDIO_VAE = {"audio_vae": {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": {
        "ch": 128, "out_ch": 2, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "resolution": 256,
        "z_channels": 8, "mel_bins": 64, "mid_block_add_attention": False}}},
    "preprocessing": {"stft": {"hop_length": 160, "causal": True}, "mel": {"n_mel_channels": 64}},
}}
REAL_VOCODER = {"vocoder": {"resblock": "1", "stereo": True, "upsample_initial_channel": 1024,
                            "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
                            "upsample_rates": [6, 5, 2, 2, 2], "upsample_kernel_sizes": [16, 15, 8, 4, 4]}}


class RandomContext(torch.nn.Module):
    """Stand-in for Gemma + connectors: one fixed random (video, audio) context per prompt."""

    def __init__(self, video_dim: int, audio_dim: int, tokens: int = 1024):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("v", torch.randn(1, tokens, video_dim, generator=g))
        self.register_buffer("a", torch.randn(1, tokens, audio_dim, generator=g))

    def forward(self, prompt: str):
        return self.v, self.a


def build_full_size(model: str, device, dtype, ctx, seed: int = 0, layers: int | None = None, plan=None):
    """`plan` (capped_plan's RequestPlan): the transformer in the plan's storage with its resident
    blocks (the others streamed from pinned host memory), as generate builds it under --max-gpu-memory."""
    from ltx_core.model.audio_vae import AudioDecoderConfigurator, VocoderConfigurator
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator

    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.models.ltx2.weights import build_model
    from ltx2_tp.pipelines.components import LTX2Components
    from ltx2_tp.pipelines.tiny import neutral_latent_statistics

    cfg = get_config(model) if layers is None else get_config(model, num_layers=layers)
    torch.manual_seed(seed)
    with torch.device(device):
        parts = dict(video_encoder=VideoEncoderConfigurator.from_config(REAL_VAE),
                     video_decoder=VideoDecoderConfigurator.from_config(REAL_VAE),
                     upsampler=LatentUpsamplerConfigurator.from_config({}),
                     audio_decoder=AudioDecoderConfigurator.from_config(REAL_AUDIO_VAE),
                     vocoder=VocoderConfigurator.from_config(REAL_VOCODER))
    parts = {k: m.to(dtype=dtype).eval() for k, m in parts.items()}  # all in the working dtype, as ltx-pipelines
    neutral_latent_statistics(parts.values())
    ctx_dims = (cfg.caption_channels, cfg.caption_channels) if cfg.caption_projection else (cfg.inner_dim,
                                                                                            cfg.audio_inner_dim)
    text = RandomContext(*ctx_dims).to(device)
    if plan is None:
        transformer = build_model(cfg, ctx, device=device, dtype=dtype, seed=seed)
    else:
        from ltx2_tp.models.ltx2.quantization import build_transformer

        transformer = build_transformer(cfg, ctx, device=device, dtype=dtype, seed=seed, plan_rule=plan.plan_rule(),
                                        quantization=None if plan.storage == "bf16" else plan.storage,
                                        resident_blocks=plan.resident_blocks if plan.streamed_blocks else None)
    return LTX2Components(transformer=transformer, text_encoder=text, video_latent_channels=128,
                          audio_latent_channels=8, audio_mel_bins=16, device=torch.device(device), dtype=dtype,
                          name=f"{model}-random", **parts)


def add_cap_args(p) -> None:
    """--max-gpu-memory / --quantization / --resident-blocks: generate's flags, for the benchmarks."""
    from ltx2_tp.memory.weights_estimate import STORAGES

    p.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="plan the request under this cap per GPU (memory/planner.py: resident / streamed blocks, "
                        "activation plan) and enforce it (set_per_process_memory_fraction), e.g. 24GiB")
    p.add_argument("--quantization", default="bf16", choices=STORAGES, help="weight storage (with --max-gpu-memory)")
    p.add_argument("--resident-blocks", type=int, default=None, help="with --max-gpu-memory; default: the planner's")


def capped_plan(a, pipeline_cls, num_frames: int, fps: float = 24.0):
    """The planner's plan of this request under --max-gpu-memory (None without it), printed; on CUDA
    the cap is enforced from here on, so the build runs under it too."""
    if a.max_gpu_memory is None:
        return None
    from ltx2_tp.memory.planner import parse_bytes
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.pipelines.planning import hard_cap, plan_pipeline

    cap = parse_bytes(a.max_gpu_memory)
    plan = plan_pipeline(get_config(a.model), pipeline_cls, width=a.width, height=a.height, num_frames=num_frames,
                         fps=fps, cap=cap, storage=a.quantization, resident_blocks=a.resident_blocks, model=a.model,
                         text_encoder=False)  # a fixed random context stands in for Gemma
    print(plan.table(), flush=True)
    if str(a.device).startswith("cuda"):
        hard_cap(cap, torch.device(a.device))
    return plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ltx-2-19b")
    p.add_argument("--pipeline-class-name", default="LTX2TwoStagePipeline,LTX2DistilledPipeline",
                   help="comma-separated: each runs warm-up + repeats over the same components")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--num-frames", type=int, default=121)
    p.add_argument("--steps", type=int, default=None, help="stage-1 steps; default the model's (LTX-2 40, LTX-2.3 30)")
    p.add_argument("--guidance", choices=["official", "cfg"], default="official",
                   help="official: the model's multimodal guidance; cfg: plain CFG on both streams")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--guidance-batch-max-tokens", type=int, default=None,
                   help="override the rule that batches a step's guidance passes (0: never batch)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    p.add_argument("--compile-cache-dir", default=None, help="inductor's cache (default: torch's /tmp one)")
    p.add_argument("--profile-dir", default=None,
                   help="after the timed runs, one more request with torch.profiler (CUPTI) around stage-1 steps "
                        "11-12 and stage-2 step 2: kernel tables written to DIR/request_<stage>_<pipeline>.md")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--ulysses-size", type=int, default=1)
    p.add_argument("--ring-size", type=int, default=1)
    p.add_argument("--official", action="store_true",
                   help="also run ltx-pipelines' TI2VidTwoStagesPipeline on the same weights and requests")
    p.add_argument("--official-tiling", choices=["default", "none"], default="default",
                   help="its VAE decode tiling: its entry point's TilingConfig.default(), or none (as ours)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--long-video-mode", choices=["auto", "dense", "tiled"], default="auto",
                   help="LTX2LongVideo's mode (dense: one piece however long)")
    p.add_argument("--json", default=None)
    add_cap_args(p)
    from ltx2_tp.cli import _add_encoder_args, _add_guidance_parallel_args, _decode_settings, _resolve_cfg_parallel

    _add_encoder_args(p)  # --video-encoder-preset / -crf / -frame-threads, --video-convert
    _add_guidance_parallel_args(p)  # --guidance-parallel-size G, --enable-cfg-parallel
    a = p.parse_args()
    _resolve_cfg_parallel(a)

    from ltx2_tp.distributed.context import init_parallel
    from ltx2_tp.pipelines.planning import apply_plan
    from ltx2_tp.pipelines.registry import get_pipeline_class

    ctx = init_parallel(a.tp_size, a.ulysses_size, a.ring_size, guidance_size=a.guidance_parallel_size)
    if a.official and torch.distributed.is_initialized():
        p.error("--official runs on one rank (ltx-pipelines has no parallel layout)")
    device = f"cuda:{torch.cuda.current_device()}" if a.device == "cuda" else a.device
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    if a.max_gpu_memory is not None and (a.model == "tiny" or ctx.is_parallel):
        p.error("--max-gpu-memory: the full-size model on one rank")
    plan = capped_plan(a, get_pipeline_class(a.pipeline_class_name.split(",")[0]), a.num_frames)
    t0 = time.perf_counter()
    if a.model == "tiny":
        from ltx2_tp.pipelines.tiny import build_tiny_components

        comps = build_tiny_components(0, device=device, dtype=dtype, ctx=ctx)
    else:
        comps = build_full_size(a.model, device, dtype, ctx, plan=plan)
    if a.compile:
        from ltx2_tp.compile import compile_blocks, use_compile_cache

        if a.compile_cache_dir:
            use_compile_cache(a.compile_cache_dir)
        compile_blocks(comps.transformer)
    build_s = time.perf_counter() - t0
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"build done in {build_s:.1f} s" + (" (the blocks compile in the first request)" if a.compile else ""),
              flush=True)
    if a.guidance_batch_max_tokens is not None:
        from ltx2_tp.memory import planner  # the one batching rule (pipelines/guidance.py asks it)

        planner.CFG_BATCH_MAX_TOKENS = a.guidance_batch_max_tokens
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    results = {}
    for name in a.pipeline_class_name.split(","):
        pipe = get_pipeline_class(name)(comps)
        pipe.stream_decode, pipe.encoder_options = _decode_settings(a)  # --decode-mode, as generate / serve
        apply_plan(plan, comps)  # after the pipeline set its own rule, as generate does
        results[name] = bench_pipeline(a, pipe, comps, ctx, rank0)
    official = bench_official(a, comps) if a.official else None
    if rank0:
        gpus = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        device_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        print(f"\n{a.model} {a.width}x{a.height}x{a.num_frames}, guidance {a.guidance}, layout[{ctx.describe()}], "
              f"compile={a.compile}, {device_name} x{gpus}, build {build_s:.1f} s")
        for name, r in results.items():
            print(f"\n{name}: {r['steps']}")
            print(f"first request (warm-up, incl. any compilation): {', '.join(f'{x:.3f}' for x in r['warmup_request_s'])} s")
            print("| Metric | mean | runs |\n|---|---|---|")
            for k, v in r["table"].items():
                print(f"| {k} | {v['mean']:.4f} s | {', '.join(f'{x:.4f}' for x in v['runs'])} |")
        if official is not None:
            print(side_by_side(results, official, gpus))
        cache = None
        if a.compile:
            from ltx2_tp.compile import compile_cache_stats

            cache = compile_cache_stats()  # restart with a warm cache: no fx_graph_cache_misses
            print(f"compile cache {a.compile_cache_dir or '(torch default)'}: {cache}")
        if a.device == "cuda":
            print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                  f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved"
                  + (f" (cap {plan.cap / 2**30:.2f} GiB, predicted DiT peak {plan.peak / 2**30:.2f})" if plan else ""))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({
                "date": datetime.date.today().isoformat(), "device": device_name, "command": " ".join(sys.argv),
                "model": a.model, "guidance": a.guidance, "layout": ctx.describe(), "compile": a.compile,
                "guidance_parallel_size": a.guidance_parallel_size, "compile_cache": cache, "pipelines": results,
                "ltx_pipelines": official,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if a.device == "cuda" else None,
                "max_gpu_memory": a.max_gpu_memory, "quantization": a.quantization,
                "plan": None if plan is None else {"resident_blocks": plan.resident_blocks,
                                                   "streamed_blocks": plan.streamed_blocks,
                                                   "predicted_dit_peak_gib": plan.peak / 2**30, "table": plan.table()},
            }, indent=1))
    return 0


OUT_DIR = Path("/tmp/ltx2_tp_bench_request")
# sglang 0.5.23's published baseline (test/server/perf_baselines/h100.json; ../shared/anchors.md):
# ltx_2_two_stage_t2v, LTX-2, 768x512x121, 40 steps, 2x H100 with cfg-parallel
SGLANG = {"gpus": 2, "Warmup-excluded request": 6.78, "Denoise per step": 0.129, "Refinement stage": 0.636,
          "Decode stage (+MP4 write)": 0.220}


def make_request(a, steps: int, seed: int):
    """The benchmark's request: the same for every pipeline (ours and ltx-pipelines')."""
    from ltx2_tp.pipelines.request import GenerationRequest

    guidance = {}
    if a.guidance == "cfg":  # the multimodal guider reduced to CFGGuider's arithmetic on both streams
        guidance = dict(video_stg_guidance_scale=0.0, video_rescale_scale=0.0, a2v_guidance_scale=1.0,
                        audio_cfg_guidance_scale=a.guidance_scale, audio_stg_guidance_scale=0.0,
                        audio_rescale_scale=0.0, v2a_guidance_scale=1.0)
    return GenerationRequest(prompt="SpongeBob talking with patrick", width=a.width, height=a.height,
                             num_frames=a.num_frames, num_inference_steps=steps, guidance_scale=a.guidance_scale,
                             seed=seed, long_video_mode=getattr(a, "long_video_mode", "auto"), **guidance)


def _mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def _table(runs) -> dict:
    """The table's rows (mean and runs) from runs {request_s, stages, steps: {stage1, stage2}} (ours and
    ltx-pipelines' alike)."""
    rows = {
        "Warmup-excluded request": [r["request_s"] for r in runs],
        "Denoise stage": [r["stages"]["stage1_denoise"] for r in runs],
        "Denoise per step": [_mean(r["steps"]["stage1"]) for r in runs],
        "Upsample": [r["stages"].get("upsample", 0.0) for r in runs],
        "Refinement stage": [r["stages"].get("stage2_refine", 0.0) for r in runs],
        "Refinement per step": [_mean(r["steps"]["stage2"]) for r in runs],
        "Decode stage (+MP4 write)": [r["stages"]["decode_and_write"] for r in runs],
    }
    return {k: {"mean": _mean(xs), "runs": xs} for k, xs in rows.items()}


def bench_official(a, comps) -> dict:
    """ltx-pipelines' TI2VidTwoStagesPipeline, warm-up + repeats, on the same weights and requests as
    LTX2TwoStagePipeline (the same seeds: run i has seed i on both sides)."""
    from official_pipeline import OfficialTwoStage

    from ltx2_tp.pipelines.registry import get_pipeline_class

    ours = get_pipeline_class("LTX2TwoStagePipeline")(comps)
    theirs = OfficialTwoStage(comps, a.official_tiling)
    steps = a.steps or ours.params.num_inference_steps
    runs, warm = [], []
    for i in range(a.warmup + a.repeat):
        req = make_request(a, steps, i)
        video, audio = ours.guidance(req)
        total, stages, step_t, latent = theirs.run(req, video, audio, OUT_DIR / f"official_r{i}.mp4")
        print(f"ltx-pipelines TI2VidTwoStagesPipeline run {i}{' (warm-up)' if i < a.warmup else ''}: {total:.3f} s  "
              + "  ".join(f"{k} {v:.3f}" for k, v in stages.items()), flush=True)
        if i < a.warmup:
            warm.append(total)
            continue
        runs.append({"request_s": total, "stages": stages,
                     "steps": {"stage1": step_t.get("stage1_denoise", []), "stage2": step_t.get("stage2_refine", [])},
                     "seed": i, "final_video_latent": latent.float().cpu()})
    # the same request through ours, to check both computed the same video (fp32: <= 1e-5; bf16: rounding)
    from ltx2_tp.pipelines import stages as our_stages
    from ltx2_tp.pipelines.base import Run

    req = make_request(a, steps, runs[-1]["seed"])
    pos, neg = our_stages.encode_text(comps, req.prompt, req.negative_prompt)
    gen = torch.Generator(device=comps.device).manual_seed(req.seed)
    ours_latent = ours.latents(Run(req, gen, pos, neg, our_stages.StageTimer(), None))[0].float().cpu()
    ref = runs[-1].pop("final_video_latent")
    for r in runs:
        r.pop("final_video_latent", None)
    diff = float((ours_latent - ref).abs().max() / ref.abs().max())
    return {"pipeline": "ltx_pipelines.ti2vid_two_stages.TI2VidTwoStagesPipeline", "tiling": a.official_tiling,
            "warmup_request_s": warm, "runs": runs, "final_video_latent_rel_diff": diff,
            "table": _table(runs)}


def side_by_side(results: dict, official: dict, gpus: int) -> str:
    """Ours | ltx-pipelines | speed-up | sglang's published 2-GPU figures | our GPU-seconds / sglang's."""
    ours = results.get("LTX2TwoStagePipeline")
    lines = [f"\nLTX2TwoStagePipeline vs ltx-pipelines' TI2VidTwoStagesPipeline (same weights, requests, device; "
             f"its tiling: {official['tiling']}); final video latents differ by {official['final_video_latent_rel_diff']:.2e} "
             f"(relative max)",
             f"| Metric | ours ({gpus} GPU) | ltx-pipelines (1 GPU) | speed-up | sglang published ({SGLANG['gpus']}x H100, "
             f"768x512x121, 40 steps) | ours GPU-s / sglang GPU-s |", "|---|---|---|---|---|---|"]
    for k, v in official["table"].items():
        mine = ours["table"][k]["mean"] if ours else float("nan")
        sg = SGLANG.get(k)
        sg_s = f"{sg:.3f} s" if sg else "-"
        ratio = f"{mine * gpus / (sg * SGLANG['gpus']):.2f}" if sg else "-"
        lines.append(f"| {k} | {mine:.3f} s | {v['mean']:.3f} s | {v['mean'] / mine:.2f}x | {sg_s} | {ratio} |")
    for name, r in results.items():
        if name != "LTX2TwoStagePipeline":
            lines.append(f"{name}: request {r['table']['Warmup-excluded request']['mean']:.3f} s")
    return "\n".join(lines)


class ProgressLog:
    """Where the first request of a pipeline is, printed as it goes (flushed, so a run cut off says
    where it stopped): each stage's start and end, a denoising loop's first step (where a compiled
    DiT compiles), every `every`-th step and its last, with the seconds since the request began
    and, under --compile, the graphs Dynamo traced so far (a warm request adds none)."""

    def __init__(self, label: str, compiled: bool, every: int = 5):
        self.label, self.compiled, self.every, self.t0 = label, compiled, every, time.perf_counter()

    def say(self, what: str) -> None:
        graphs = ""
        if self.compiled:
            from torch._dynamo.utils import counters

            graphs = f"  [graphs {counters['stats']['unique_graphs']}]"
        print(f"  {self.label} {time.perf_counter() - self.t0:8.1f} s  {what}{graphs}", flush=True)

    def step(self, stage: str, done: int, total: int, step_s: float | None) -> None:
        if done == 0:
            self.say(f"{stage}: {total} steps")
        elif done in (1, total) or done % self.every == 0:
            self.say(f"{stage} step {done}/{total}" + (f" ({step_s:.2f} s)" if step_s is not None else ""))

    def timer(self, sync: bool):
        """A StageTimer that says when each stage starts and ends."""
        from contextlib import contextmanager

        from ltx2_tp.pipelines.stages import StageTimer

        log = self

        class LoudTimer(StageTimer):
            @contextmanager
            def __call__(self, name: str):
                log.say(f"{name} ...")
                with StageTimer.__call__(self, name):
                    yield
                log.say(f"{name} done ({self.times[name]:.2f} s)")

        return LoudTimer(sync=sync)


def bench_pipeline(a, pipe, comps, ctx, rank0) -> dict:
    """Warm-up + repeats of one pipeline: request time, stage times, per-step times; the first
    request's progress printed as it goes (ProgressLog)."""
    from ltx2_tp.pipelines.stages import StageTimer

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    OUT_DIR.mkdir(exist_ok=True)
    steps = a.steps or pipe.params.num_inference_steps
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    runs, seen, warm = [], {}, []
    for i in range(a.warmup + a.repeat):
        step_t: dict[str, list[float]] = {"stage1": [], "stage2": []}
        last = [time.perf_counter()]
        log = ProgressLog(f"{pipe.name} run {i}", a.compile, max(1, steps // 8)) if rank0 and i == 0 else None

        def progress(stage, done, total):
            step_s = None
            if stage in step_t:
                sync()
                now = time.perf_counter()
                if done:  # done == 0: the loop starts
                    step_s = now - last[0]
                    step_t[stage].append(step_s)
                last[0] = now
                seen[stage] = total
            if log is not None and stage != "done":
                log.step(stage, done, total, step_s)

        req = make_request(a, steps, i)
        if i == a.warmup + a.repeat - 1 and getattr(a, "profile_dir", None):
            _profile_request(a, pipe, make_request(a, steps, i + 1), rank0)
        timer = log.timer(a.device == "cuda") if log is not None else StageTimer(sync=a.device == "cuda")
        sync()
        t = time.perf_counter()
        pipe(req, OUT_DIR / f"r{i}_rank{rank}.mp4", progress=progress, timer=timer)
        sync()
        total = time.perf_counter() - t
        if i < a.warmup:
            warm.append(total)
        else:
            runs.append({"request_s": total, "stages": dict(timer.times), "stage_parts": dict(timer.parts),
                         "stage1_steps": step_t["stage1"],
                         "stage2_steps": step_t["stage2"]})
        if rank0:
            print(f"{pipe.name} run {i}{' (warm-up)' if i < a.warmup else ''}: {total:.3f} s  " +
                  "  ".join(f"{k} {v:.3f}" for k, v in timer.times.items()) +
                  "  (" + "  ".join(f"{k} {v:.3f}" for k, v in timer.parts.items()) + ")", flush=True)

    v, au = pipe.guidance(req) if pipe.guided else (None, None)
    what = (f"stage 1 {seen.get('stage1')} denoiser calls, stage 2 {seen.get('stage2')} (res_2s: 2 a step)"
            + (f"; video {v}; audio {au}" if v is not None else "; no guidance"))
    table = _table([{**r, "steps": {"stage1": r["stage1_steps"], "stage2": r["stage2_steps"]}} for r in runs])
    return {"steps": what, "runs": runs, "warmup_request_s": warm, "table": table}


def _caller() -> str:
    """The innermost frames outside torch and warnings: who asked for the value."""
    import traceback

    frames = [f for f in traceback.extract_stack()[:-2]
              if "/torch/" not in f.filename and "warnings" not in f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))


def _profile_request(a, pipe, req, rank0) -> None:
    """One request with the profiler on around stage-1 steps 11-12 (2 steps) and stage-2 step 2."""
    from torch.profiler import ProfilerActivity, profile

    from common import kernel_summary, summary_markdown

    import warnings
    from collections import Counter

    windows = {"stage1": (10, 12), "stage2": (1, 2)}  # (start after step, stop after step)
    summaries, syncs = {}, {}
    prof, caught = [None], [None]

    def progress(stage, done, total):
        if stage not in windows:
            return
        start, stop = windows[stage]
        if done == start:
            torch.cuda.synchronize()
            prof[0] = profile(activities=[ProfilerActivity.CUDA])
            prof[0].start()
        elif done == start + 1:  # the next step: where the host waits for the GPU (set_sync_debug_mode)
            got = syncs.setdefault(stage, [])
            caught[0] = warnings.catch_warnings()
            caught[0].__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = lambda *w, **k: got.append(_caller())
            torch.cuda.set_sync_debug_mode("warn")
        if done == stop and prof[0] is not None:
            torch.cuda.set_sync_debug_mode("default")
            caught[0].__exit__(None, None, None)
            torch.cuda.synchronize()
            prof[0].stop()
            summaries[stage] = (kernel_summary(prof[0]), stop - start)
            prof[0] = None

    from ltx2_tp.pipelines.stages import StageTimer
    pipe(req, OUT_DIR / "profiled.mp4", progress=progress, timer=StageTimer(sync=True))
    if not rank0:
        return
    stamp = f"{torch.cuda.get_device_name()} | {datetime.date.today()} | `{' '.join(sys.argv)}`"
    for stage, (s, n) in summaries.items():
        path = Path(a.profile_dir) / f"request_{stage}_{pipe.name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(summary_markdown(f"{pipe.name} {stage}: {n} step(s) of a warm request", stamp, s))
        print(f"profile {stage} ({n} steps): {s['total_ms']:.1f} ms of kernels -> {path}", flush=True)
        where = Counter(syncs.get(stage, ()))
        print(f"  host-GPU synchronisations in one {stage} step: {sum(where.values())}", flush=True)
        for k, c in where.most_common(12):
            print(f"    {c:4d}  {k}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
