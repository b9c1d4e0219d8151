"""`ltx2-tp` command line.

  ltx2-tp dit --model tiny                 one DiT forward (random weights): shapes and time
  torchrun --nproc-per-node 2 -m ltx2_tp.cli dit --model ltx-2-19b --tp-size 2 --device cuda ...

Bad values stop with a message naming the flag and the allowed values, before any model is built.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ltx2_tp.models.ltx2.config import PRESETS


class UsageError(ValueError):
    pass


def video_tokens(frames: int, height: int, width: int) -> int:
    return ((frames - 1) // 8 + 1) * (height // 32) * (width // 32)


def validate_video_args(frames: int, height: int, width: int, multiple: int = 32) -> None:
    if frames < 1 or (frames - 1) % 8:
        raise UsageError(f"--num-frames must be 8k+1 (1, 9, 17, ..., 121, ...), got {frames}")
    for flag, v in (("--height", height), ("--width", width)):
        if v < multiple or v % multiple:
            raise UsageError(f"{flag} must be a positive multiple of {multiple}, got {v}")


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def cmd_dit(args) -> int:
    from ltx2_tp.distributed.context import init_parallel
    from ltx2_tp.memory.plan import ExecutionPlan, plan_for
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.models.ltx2.weights import build_model
    from ltx2_tp.step_inputs import synthetic_step_inputs

    validate_video_args(args.num_frames, args.height, args.width)
    cfg = get_config(args.model)
    if args.ring_size * args.ulysses_size != args.sp_size:
        raise UsageError(f"--sp-size ({args.sp_size}) must equal --ulysses-size x --ring-size "
                         f"({args.ulysses_size} x {args.ring_size})")
    cfg.validate_parallel(args.tp_size, args.ulysses_size)
    ctx = init_parallel(args.tp_size, args.ulysses_size, args.ring_size)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    tokens = video_tokens(args.num_frames, args.height, args.width)
    plan = plan_for(-(-tokens // ctx.sp_size), cfg.inner_dim, ctx.tp_size)
    if args.ffn_chunk_tokens or args.attn_chunk_tokens:
        plan = ExecutionPlan(args.ffn_chunk_tokens, args.attn_chunk_tokens, cache_rope=not args.attn_chunk_tokens)
    dtype = _dtype(args.dtype)
    t0 = time.perf_counter()
    model = build_model(cfg, ctx, device=device, dtype=dtype, seed=args.seed, plan=plan)
    t_build = time.perf_counter() - t0
    video, audio = synthetic_step_inputs(cfg, args.num_frames, args.height, args.width, args.fps, device, dtype,
                                         seed=args.seed)
    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        vx, ax = model(video, audio)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        print(f"model={args.model} layout[{ctx.describe()}] plan[{plan.describe()}] device={device} dtype={args.dtype}")
        print(f"video latent {tuple(video.latent.shape)} -> velocity {tuple(vx.shape)}")
        if ax is not None:
            print(f"audio latent {tuple(audio.latent.shape)} -> velocity {tuple(ax.shape)}")
        print(f"build {t_build:.2f} s; forward s/step: " + ", ".join(f"{x:.4f}" for x in times))
        if device.type == "cuda":
            print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltx2-tp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dit", help="one DiT forward with random weights: shapes and time")
    d.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    d.add_argument("--num-frames", type=int, default=25)
    d.add_argument("--height", type=int, default=256)
    d.add_argument("--width", type=int, default=384)
    d.add_argument("--fps", type=float, default=24.0)
    d.add_argument("--tp-size", type=int, default=1)
    d.add_argument("--sp-size", type=int, default=1)
    d.add_argument("--ulysses-size", type=int, default=None, help="default: --sp-size (all Ulysses)")
    d.add_argument("--ring-size", type=int, default=1)
    d.add_argument("--ffn-chunk-tokens", type=int, default=None)
    d.add_argument("--attn-chunk-tokens", type=int, default=None)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--repeat", type=int, default=2)
    d.set_defaults(func=cmd_dit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ulysses_size", 1) is None:
        args.ulysses_size = args.sp_size // args.ring_size if args.sp_size % args.ring_size == 0 else args.sp_size
    try:
        return args.func(args)
    except ValueError as e:  # UsageError, config validation, layout errors
        print(f"ltx2-tp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
