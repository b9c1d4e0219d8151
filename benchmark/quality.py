"""What the opt-in approximations cost in quality: each prompt generated exactly and with each
approximation (same seed), compared on the final latents and the decoded frames.

    python benchmark/quality.py --model-path /models/LTX-2 --prompts-file prompts.txt \
        --width 768 --height 512 --num-frames 121 --out benchmark/results/quality_ltx2_<gpu>_<date>.json
    python benchmark/quality.py --model tiny --device cpu --width 256 --height 192 --num-frames 97   (random weights)

Reported per variant (mean over prompts, and per prompt in the JSON): the video latent's relative
error against the exact run (||x - x_exact|| / ||x_exact||, and max |x - x_exact| / max |x_exact|),
the audio latent's, the decoded frames' PSNR against the exact run's frames (uint8, the whole
video; and its worst frame), LPIPS (AlexNet) when the `lpips` package is installed, the denoising
time (every stage up to the final latents, text encoding excluded) and what the approximation did (frames denoised, steps and DiT passes skipped). Decoding both
runs streams them frame chunk by frame chunk, so a long 1080p video never sits in memory whole.

Quality on real weights is for the user to judge with this script: the figures in the README are
from random weights (what the mechanics do to the numbers, not to a picture). PSNR against the
exact run measures difference, not quality: a different but equally good video scores low too;
look at the videos (`--write-videos DIR`) before trusting any threshold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

PROMPTS = ["A red fox trots through fresh snow at dawn, its breath steaming, the camera tracking low beside it.",
           "A busy city street at night in the rain, neon signs reflecting on wet asphalt as people pass with umbrellas.",
           "Waves roll onto a rocky beach under a cloudy sky; a gull lands on a rock and calls out."]


def variants(a) -> list[tuple[str, dict]]:
    """(name, request fields) of every approximation asked for, the exact run first."""
    out = [("exact", {})]
    out += [(f"window K={k}", {"attention_window_frames": k}) for k in _ints(a.windows)]
    out += [(f"stride S={s}", {"keyframe_stride": s}) for s in _ints(a.strides)]
    out += [(f"step cache T={t:g}", {"step_cache_threshold": t}) for t in _floats(a.thresholds)]
    return out


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class Lpips:
    """LPIPS (AlexNet) over frames, when the `lpips` package is installed (it downloads its weights)."""

    def __init__(self, device):
        try:
            import lpips  # noqa: F401
        except ImportError:
            self.net = None
            return
        import lpips

        self.net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean over the frames of two uint8 (f, h, w, 3) chunks."""
        def prep(x):
            return x.to(next(self.net.parameters()).device).permute(0, 3, 1, 2).float() / 127.5 - 1

        with torch.no_grad():
            return float(self.net(prep(a), prep(b)).mean())


def compare_frames(c, latent: torch.Tensor, exact: torch.Tensor, seed: int, lpips_fn: Lpips, write=None) -> dict:
    """PSNR (whole video and worst frame) and LPIPS of the decoded frames, chunk by chunk."""
    from ltx2_tp.pipelines import stages
    from ltx2_tp.pipelines.decode import AUTO, resolve_tile

    tile = resolve_tile(c, exact, AUTO)
    ours, _ = stages.decode_video(c, latent, tile, torch.Generator(device=c.device).manual_seed(seed))
    ref, _ = stages.decode_video(c, exact, tile, torch.Generator(device=c.device).manual_seed(seed))
    sq, n, worst, lp, lp_n = 0.0, 0, math.inf, 0.0, 0
    for a, b in zip(ours, ref):
        d = (a.float() - b.float()).pow(2).flatten(1).mean(1)  # per frame
        sq += float(d.sum())
        n += d.numel()
        worst = min(worst, psnr(float(d.max())))
        if lpips_fn.net is not None:
            lp += lpips_fn(a, b) * a.shape[0]
            lp_n += a.shape[0]
        if write is not None:
            write.append(a.cpu())
    return {"psnr_db": psnr(sq / max(n, 1)), "worst_frame_psnr_db": worst,
            "lpips": lp / lp_n if lp_n else None, "frames": n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ltx2_tp.cli import (_add_checkpoint_args, _add_device_args, _add_layout_args, _add_speed_args,
                             _checkpoint_files, _components)

    p.add_argument("--model", default="tiny", help="tiny (embedded, random weights) when no --model-path")
    _add_checkpoint_args(p)
    p.add_argument("--pipeline-class-name", default="LTX2TwoStagePipeline")
    p.add_argument("--prompt", action="append", default=[], help="repeat; default: three built-in prompts")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--num-frames", type=int, default=121)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the model's")
    p.add_argument("--windows", default="2,4", help="temporal-window radii K to try (latent frames)")
    p.add_argument("--strides", default="2,3", help="keyframe strides S to try")
    p.add_argument("--thresholds", default="0.05,0.1", help="step-cache thresholds T to try")
    p.add_argument("--warmup", type=int, default=1, help="exact runs of the first prompt before timing (not recorded)")
    p.add_argument("--write-videos", default=None, metavar="DIR", help="also write every run's MP4 there")
    p.add_argument("--out", default=None, help="JSON results")
    _add_layout_args(p)
    _add_speed_args(p)
    _add_device_args(p, cpu_dtype="fp32")
    a = p.parse_args()
    a.ulysses_size = a.ulysses_size or max(1, a.sp_size // a.ring_size)

    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.request import GenerationRequest
    from ltx2_tp.serving.ranks import this_rank

    if a.attention != "auto":
        from ltx2_tp.layers.attention_backend import set_attention_backend

        set_attention_backend(a.attention)
    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += [line.strip() for line in Path(a.prompts_file).read_text().splitlines() if line.strip()]
    prompts = prompts or PROMPTS
    files = _checkpoint_files(a)
    comps = _components(a, files)
    cls = get_pipeline_class(a.pipeline_class_name)
    pipe = cls(comps)
    steps = a.num_inference_steps or pipe.params.num_inference_steps
    rank0 = this_rank() == 0
    lpips_fn = Lpips(comps.device)
    rows: dict[str, list[dict]] = {}
    for _ in range(a.warmup):  # first-call costs (kernel selection, allocator) out of the timed runs
        pipe.run_latents(GenerationRequest(prompt=prompts[0], width=a.width, height=a.height, num_frames=a.num_frames,
                                           fps=a.fps, num_inference_steps=steps, seed=a.seed))
    for pi, prompt in enumerate(prompts):
        exact = None
        for name, fields in variants(a):
            req = GenerationRequest(prompt=prompt, width=a.width, height=a.height, num_frames=a.num_frames, fps=a.fps,
                                    num_inference_steps=steps, seed=a.seed, **fields)
            run, video, audio = pipe.run_latents(req)
            seconds = sum(v for k, v in run.timer.times.items() if k != "text_encoding")  # synced on CUDA
            row = {"prompt": pi, "denoise_s": seconds, "stages": dict(run.timer.times),
                   "approximations": run.approximations}
            if exact is None:
                exact = (video, audio)
            else:
                row.update(video_rel_l2=rel_l2(video, exact[0]), video_rel_max=rel_max(video, exact[0]),
                           audio_rel_l2=rel_l2(audio, exact[1]),
                           **compare_frames(comps, video, exact[0], a.seed, lpips_fn))
            if a.write_videos and rank0:
                from ltx2_tp.pipelines.decode import decode_and_write

                out = Path(a.write_videos) / f"p{pi}_{name.replace(' ', '_').replace('=', '')}.mp4"
                out.parent.mkdir(parents=True, exist_ok=True)
                decode_and_write(comps, video, audio, a.fps, out, generator=torch.Generator(device=comps.device)
                                 .manual_seed(a.seed))
            rows.setdefault(name, []).append(row)
            if rank0:
                extra = "" if name == "exact" else (f"  latent rel {row['video_rel_l2']:.3e}  PSNR {row['psnr_db']:.2f} dB"
                                                    f"  worst frame {row['worst_frame_psnr_db']:.2f} dB")
                print(f"prompt {pi} {name:<18} {seconds:8.2f} s{extra}", flush=True)
    if not rank0:
        return 0
    table = summary(rows)
    print(f"\n{a.model_path or a.model} {a.pipeline_class_name} {a.width}x{a.height}x{a.num_frames}, {steps} steps, "
          f"{len(prompts)} prompt(s), seed {a.seed}, {comps.device} {a.dtype}")
    print(table)
    if a.out:
        device = torch.cuda.get_device_name() if comps.device.type == "cuda" else "cpu"
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "command": " ".join(sys.argv), "model": a.model_path or a.model, "pipeline": a.pipeline_class_name,
            "size": [a.width, a.height, a.num_frames], "steps": steps, "prompts": prompts, "seed": a.seed,
            "dtype": a.dtype, "variants": rows, "table": table}, indent=1, default=_json_default))
    return 0


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def summary(rows: dict[str, list[dict]]) -> str:
    lines = ["| variant | denoise s | speed-up | video latent rel. L2 | rel. max | audio rel. L2 | PSNR dB | worst frame dB "
             "| LPIPS | what it did |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = statistics.mean(r["denoise_s"] for r in rows["exact"])
    for name, rs in rows.items():
        s = statistics.mean(r["denoise_s"] for r in rs)

        def m(k, fmt):
            xs = [r[k] for r in rs if r.get(k) is not None]
            return "-" if not xs else format(statistics.mean(xs), fmt)

        worst = "-" if name == "exact" else f"{min(r['worst_frame_psnr_db'] for r in rs):.2f}"
        lines.append(f"| {name} | {s:.2f} | {base / s:.2f}x | {m('video_rel_l2', '.3e')} | {m('video_rel_max', '.3e')} "
                     f"| {m('audio_rel_l2', '.3e')} | {m('psnr_db', '.2f')} | {worst} | {m('lpips', '.4f')} "
                     f"| {did(rs[0]['approximations'])} |")
    return "\n".join(lines)


def did(report: dict) -> str:
    parts = [f"{st}: {r['denoised_frames']}/{r['frames']} frames" for st, r in report.get("keyframe_stride", {}).items()]
    parts += [f"{st}: skipped {r['skipped_steps']}/{r['steps']} steps, {r['skipped_dit_passes']}/"
              f"{r['dit_passes'] + r['skipped_dit_passes']} passes" for st, r in report.get("step_cache", {}).items()]
    return "; ".join(parts) or "-"


if __name__ == "__main__":
    sys.exit(main())
