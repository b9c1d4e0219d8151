"""A tiled long video end to end (LTX2LongVideo, long_video_mode tiled): wall time, per-tile times,
peak GPU memory, and the written file read back with PyAV (frames, duration, audio duration).

Full-size DiT and VAEs with seeded random weights (bench_request.py's build_full_size: the text
encoder is a fixed random context, no distilled LoRA); eager unless --compile. Decode and encoder
settings as generate's (--decode-mode, default fast: the VAE streamed, x264 ultrafast with frame
threads); random weights decode to noise, x264's worst case by 10x (README 'Decode and write'), so
--decode-mode exact (x264 medium) would time the encoder, not the pipeline.

    python benchmark/bench_tiled.py --steps 8 --json benchmark/results/bench_tiled_h100.json   # 2 min, 768x512x2881
    python benchmark/bench_tiled.py --device cpu --model tiny --width 64 --height 64 --num-frames 97 --steps 1 \
        --tile-frames 24 --tile-overlap-frames 16                                              # CPU smoke run

Time on one H100 (eager, 19B, 768x512, ComfyUI's 80 / 24 tiles: 52 tiles of 73 frames): per tile
about steps x 0.25 s (stage 1 at 384x256: 960 tokens x 4 guidance passes, batched) + 3 x 0.3 s
(stage 2 at 3,840 tokens) + ~0.6 s (upsample, decode) -> 8 steps: ~3.5 s a tile, ~3 min for the
video, plus 1-2 min to build the model. --estimate prints this before running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# one H100, eager, 19B (README / anchors.md / the lead's measurements): seconds per stage-1 step
# with 4 guidance passes per 1,536 half-size tokens, per stage-2 step per 6,144 tokens, decode per frame
H100_S1_STEP_S, H100_S1_TOKENS = 0.3, 1536
H100_S2_STEP_S, H100_S2_TOKENS = 0.43, 6144
H100_DECODE_S_PER_FRAME = 0.8 / 121


def estimate_s(tiles, width: int, height: int, steps: int) -> float:
    """Seconds for the tiles on one H100 (eager): step costs scaled by tokens, floored at 60% of the
    measured point (small token counts are weight-bandwidth bound, not proportional)."""
    from ltx2_tp.latent_grid import LatentGrid

    total = 0.0
    for t in tiles:
        s2 = LatentGrid(t.frames, height, width).video_tokens
        s1 = LatentGrid(t.frames, height // 2, width // 2).video_tokens
        total += steps * H100_S1_STEP_S * max(0.6, s1 / H100_S1_TOKENS)
        total += 3 * H100_S2_STEP_S * max(0.6, s2 / H100_S2_TOKENS)
        total += t.frames * H100_DECODE_S_PER_FRAME + 0.1  # + upsample
    return total


def read_back(path: Path) -> dict:
    """Frames (video packets, demuxed), durations of both streams, audio samples (decoded AAC)."""
    import av

    with av.open(str(path)) as f:
        v = f.streams.video[0]
        frames = sum(1 for p in f.demux(v) if p.size)
    with av.open(str(path)) as f:
        a = f.streams.audio[0]
        samples = sum(fr.samples for fr in f.decode(a))
        rate = a.rate
        v = f.streams.video[0]
        video_s = float(v.duration * v.time_base) if v.duration else None
    return {"frames": frames, "video_duration_s": video_s, "audio_samples": samples, "audio_rate": rate,
            "audio_duration_s": samples / rate}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ltx-2-19b")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--num-frames", type=int, default=2881, help="8k+1 (2881: two minutes at 24 fps)")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--steps", type=int, default=8, help="stage-1 steps per tile (the model's default: 40)")
    p.add_argument("--tile-frames", type=int, default=80)
    p.add_argument("--tile-overlap-frames", type=int, default=24)
    p.add_argument("--tile-cond-strength", type=float, default=0.5)
    p.add_argument("--adain-factor", type=float, default=0.0)
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (compiles per tile shape)")
    p.add_argument("--fp8", action="store_true", help="fp8 block linears")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="/tmp/ltx2_tp_bench_tiled.mp4")
    p.add_argument("--estimate", action="store_true", help="print the H100 time estimate and stop")
    p.add_argument("--json", default=None)
    from ltx2_tp.cli import _add_encoder_args, _decode_settings

    _add_encoder_args(p)  # --decode-mode fast (default: streamed VAE, x264 ultrafast, frame threads) | exact
    from bench_request import add_cap_args

    add_cap_args(p)  # --max-gpu-memory (the planner's plan of one tile, enforced), --quantization, --resident-blocks
    a = p.parse_args()
    if a.fp8 and a.max_gpu_memory is not None:
        p.error("--fp8 quantizes after the build; with --max-gpu-memory use --quantization")

    from ltx2_tp.pipelines.request import GenerationRequest
    from ltx2_tp.pipelines.tiling import plan_tiles

    tiles = plan_tiles(a.num_frames, a.fps, a.tile_frames, a.tile_overlap_frames)
    est = estimate_s(tiles, a.width, a.height, a.steps)
    print(f"{len(tiles)} tiles of {tiles[0].frames} frames ({tiles[1].overlap_frames if len(tiles) > 1 else 0} "
          f"cross-faded); H100 estimate (19B, eager): {est:.0f} s + model build", flush=True)
    if a.estimate:
        return 0

    from bench_request import build_full_size, capped_plan

    from ltx2_tp.distributed.context import SINGLE
    from ltx2_tp.pipelines.planning import apply_plan
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.stages import StageTimer

    cuda = a.device.startswith("cuda")
    device = f"cuda:{torch.cuda.current_device()}" if a.device == "cuda" else a.device
    dtype = torch.bfloat16 if cuda else torch.float32
    if a.max_gpu_memory is not None and a.model == "tiny":
        p.error("--max-gpu-memory: the full-size model")
    plan = capped_plan(a, get_pipeline_class("LTX2LongVideo"), tiles[0].frames, a.fps)  # one tile's memory
    t0 = time.perf_counter()
    if a.model == "tiny":
        from ltx2_tp.pipelines.tiny import build_tiny_components

        comps = build_tiny_components(0, device=device, dtype=dtype)
    else:
        comps = build_full_size(a.model, device, dtype, SINGLE, plan=plan)
    if a.fp8:
        from ltx2_tp.layers.fp8 import quantize_fp8

        quantize_fp8(comps.transformer)
    if a.compile:
        from ltx2_tp.compile import compile_blocks

        compile_blocks(comps.transformer)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    print(f"built {a.model} in {build_s:.1f} s", flush=True)

    pipe = get_pipeline_class("LTX2LongVideo")(comps)
    pipe.stream_decode, pipe.encoder_options = _decode_settings(a)  # the same decode settings as generate / serve
    apply_plan(plan, comps)
    req = GenerationRequest(prompt="a long walk along a river at dusk", width=a.width, height=a.height,
                            num_frames=a.num_frames, fps=a.fps, num_inference_steps=a.steps, seed=0,
                            long_video_mode="tiled", tile_frames=a.tile_frames, tile_overlap_frames=a.tile_overlap_frames,
                            tile_cond_strength=a.tile_cond_strength, adain_factor=a.adain_factor)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps: dict[str, list[float]] = {"stage1": [], "stage2": []}
    last = [time.perf_counter()]
    t_start = [0.0]

    def progress(stage, done, total):
        kind = stage.rsplit(" ", 1)[-1]
        if kind in steps:
            sync()
            now = time.perf_counter()
            if done:
                steps[kind].append(now - last[0])
            last[0] = now
        if kind == "decode" and done:
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            print(f"{stage.rsplit(' ', 1)[0]} done at {time.perf_counter() - t_start[0]:.1f} s, peak {peak:.2f} GiB",
                  flush=True)

    timer = StageTimer(sync=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t_start[0] = time.perf_counter()
    res = pipe(req, a.output, progress=progress, timer=timer)
    sync()
    wall = time.perf_counter() - t_start[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    back = read_back(Path(a.output))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{a.model} {a.width}x{a.height}x{a.num_frames} @ {a.fps:g} fps, tiled {a.tile_frames}/{a.tile_overlap_frames}, "
          f"{a.steps} + 3 steps, {device_name}, build {build_s:.1f} s")
    print("| metric | value |\n|---|---|")
    rows = [("wall time (request)", f"{wall:.1f} s"), ("tiles", str(len(res.tile_seconds))),
            ("per tile: first / mean of the rest / max", f"{res.tile_seconds[0]:.2f} / "
             f"{mean(res.tile_seconds[1:]):.2f} / {max(res.tile_seconds):.2f} s"),
            ("stage-1 step (mean)", f"{mean(steps['stage1']):.3f} s"), ("stage-2 step (mean)", f"{mean(steps['stage2']):.3f} s"),
            *((k, f"{v:.1f} s") for k, v in timer.times.items()),
            ("peak GPU memory (allocated / reserved)", f"{peak:.2f} / {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB"
             if peak is not None else "-"),
            ("cap (planner's predicted DiT peak)", f"{plan.cap / 2**30:.2f} GiB ({plan.peak / 2**30:.2f})" if plan else "-"),
            ("estimate (H100, eager)", f"{est:.0f} s"),
            ("read back: frames", f"{back['frames']} (asked {a.num_frames})"),
            ("read back: video duration", f"{back['video_duration_s']} s"),
            ("read back: audio duration", f"{back['audio_duration_s']:.3f} s ({back['audio_samples']} samples at "
                                          f"{back['audio_rate']} Hz; written {res.audio_samples})")]
    for k, v in rows:
        print(f"| {k} | {v} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device": device_name, "command": " ".join(sys.argv),
            "model": a.model, "size": f"{a.width}x{a.height}", "frames": a.num_frames, "fps": a.fps, "steps": a.steps,
            "tile_frames": a.tile_frames, "tile_overlap_frames": a.tile_overlap_frames, "build_s": build_s,
            "wall_s": wall, "tile_seconds": res.tile_seconds, "stage_times": timer.times, "stage_parts": timer.parts,
            "stage1_step_s": mean(steps["stage1"]), "stage2_step_s": mean(steps["stage2"]), "peak_gib": peak,
            "estimate_s": est, "written_audio_samples": res.audio_samples, "read_back": back,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "max_gpu_memory": a.max_gpu_memory, "quantization": a.quantization,
            "plan": None if plan is None else {"resident_blocks": plan.resident_blocks, "table": plan.table(),
                                               "predicted_dit_peak_gib": plan.peak / 2**30}}, indent=1))
    return 0 if back["frames"] == a.num_frames else 1


if __name__ == "__main__":
    sys.exit(main())
