"""`ltx2-tp` command line.

  ltx2-tp generate --model tiny --prompt "a red fox" --output-path outputs/fox.mp4
  ltx2-tp dit --model tiny                 one DiT forward (random weights): shapes and time
  torchrun --nproc-per-node 2 -m ltx2_tp.cli dit --model ltx-2-19b --tp-size 2 --device cuda ...

Bad values stop with a message naming the flag and the allowed values, before any model is built.
"""

from __future__ import annotations

import argparse
import copy
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
    cfg.validate_parallel(args.tp_size, args.ulysses_size)
    ctx = init_parallel(args.tp_size, args.ulysses_size, args.ring_size)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    tokens = video_tokens(args.num_frames, args.height, args.width)
    plan = plan_for(-(-tokens // ctx.sp_size), cfg.inner_dim, ctx.tp_size, ulysses_size=ctx.ulysses_size)
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


def cmd_generate(args) -> int:
    from ltx2_tp.pipelines.request import GenerationRequest, RequestError

    fmt = args.output_format or (args.output_path.rsplit(".", 1)[-1].lower() if "." in args.output_path else "mp4")
    req = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                            height=args.height, num_frames=args.num_frames, fps=args.fps,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, image_path=args.image_path, output_format=fmt)
    try:  # every value checked before anything is built
        req.validate()
    except RequestError as e:
        raise UsageError(f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None
    if args.image_path:
        _check_image(args.image_path)
    files = _checkpoint_files(args)
    _check_layout(args, files)
    _check_speed_args(args, files)

    from tqdm import tqdm

    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.stages import StageTimer
    from ltx2_tp.serving.ranks import run_on_rank, this_rank

    comps = _components(args, files)
    pipe = get_pipeline_class(args.pipeline_class_name)(comps)
    rank0 = this_rank() == 0
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if not rank0 or stage == "done":
            return
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="step")
        bars[stage].update(done - bars[stage].n)

    timer = StageTimer(sync=comps.device.type == "cuda")
    result = run_on_rank(pipe, req, args.output_path, this_rank(), progress=progress, timer=timer)
    for b in bars.values():
        b.close()
    if result is None:  # not rank 0
        return 0
    print(timer.table())
    print(f"wrote {result.path} ({result.frames} frames {result.width}x{result.height} @ {result.fps:g} fps, "
          f"{result.audio_samples} audio samples)")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.serving.api import create_app
    from ltx2_tp.serving.events import log_to_stderr
    from ltx2_tp.serving.jobs import JobManager
    from ltx2_tp.serving.ranks import ControlChannel, ControlLost, LeaderPipeline, RankSync, follow

    for flag, v, lo in (("--max-queue", args.max_queue, 1), ("--ttl-s", args.ttl_s, 1),
                        ("--max-upload-bytes", args.max_upload_bytes, 1), ("--max-image-pixels", args.max_image_pixels, 1),
                        ("--max-prompt-chars", args.max_prompt_chars, 1), ("--max-video-tokens", args.max_video_tokens, 1),
                        ("--collective-timeout-s", args.collective_timeout_s, 1), ("--port", args.port, 0)):
        if v < lo:
            raise UsageError(f"{flag} must be at least {lo}, got {v}")
    files = _checkpoint_files(args)
    _check_layout(args, files)
    _check_speed_args(args, files)
    pipe = get_pipeline_class(args.pipeline_class_name)(_components(args, files))
    if torch.distributed.is_initialized():  # one worker drives every rank: rank 0 serves HTTP, the others follow
        channel = ControlChannel()
        sync = RankSync(channel, pipe.c.ctx, pipe.c.device, args.collective_timeout_s)
        if channel.rank != 0:
            try:
                follow(pipe, channel, sync)
            except (ControlLost, KeyboardInterrupt) as e:
                print(f"[rank {channel.rank}] stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return 1 if isinstance(e, ControlLost) else 0
            return 0
        pipe = LeaderPipeline(pipe, channel, sync)
    log_to_stderr()
    manager = JobManager(pipe, args.output_dir, args.max_queue, args.ttl_s)
    app = create_app(manager, model_name=args.served_model_name, api_key=args.api_key,
                     max_video_tokens=args.max_video_tokens, default_steps=args.num_inference_steps,
                     max_upload_bytes=args.max_upload_bytes, max_prompt_chars=args.max_prompt_chars,
                     max_image_pixels=args.max_image_pixels)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    status = [0]

    def fatal(e: BaseException) -> None:  # the ranks can no longer work together: stop (torchrun may restart)
        print(f"ltx2-tp: error: {e}", file=sys.stderr, flush=True)
        status[0] = 1
        server.should_exit = True

    manager.on_fatal = fatal
    try:
        server.run()
    finally:
        stopped = manager.close()
        if isinstance(pipe, LeaderPipeline) and stopped and not status[0]:
            try:
                pipe.stop()
            except ControlLost:
                pass
    return status[0]


def _check_layout(args, files) -> None:
    """--num-gpus = TP x SP, and TP / Ulysses must divide the heads: checked before anything is built."""
    from ltx2_tp.models.ltx2.config import LTX2Config, get_config

    if args.tp_size * args.sp_size != args.num_gpus:
        raise UsageError(f"--num-gpus ({args.num_gpus}) must equal --tp-size x --sp-size ({args.tp_size} x {args.sp_size})")
    if files is None:
        get_config("tiny").validate_parallel(args.tp_size, args.ulysses_size)
    else:
        from ltx2_tp.models.ltx2.weights import read_checkpoint_config

        meta = read_checkpoint_config([files.checkpoint]) or {}
        LTX2Config.from_checkpoint_config(meta).validate_parallel(args.tp_size, args.ulysses_size)


def _checkpoint_files(args):
    """None for the embedded tiny model, else the official files (every missing one names its flag)."""
    from ltx2_tp.pipelines.checkpoints import CheckpointFiles
    from ltx2_tp.pipelines.request import RequestError

    if not args.model_path:
        if args.model != "tiny":
            raise UsageError(f"--model {args.model} needs --model-path (only --model tiny is embedded)")
        return None
    try:
        return CheckpointFiles.discover(args.model_path, args.spatial_upsampler_path, args.text_encoder_path,
                                        args.distilled_lora_path, args.distilled_lora_strength)
    except RequestError as e:
        raise UsageError(f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None


def _components(args, files):
    """Join the torchrun ranks (if any), then build the components on this rank's device."""
    from ltx2_tp.distributed.context import init_parallel
    from ltx2_tp.pipelines.checkpoints import build_checkpoint_components
    from ltx2_tp.pipelines.components import build_tiny_components

    ctx = init_parallel(args.tp_size, args.ulysses_size, args.ring_size)
    device = args.device
    if device == "cuda" and ctx.is_parallel:
        device = f"cuda:{torch.cuda.current_device()}"

    if files is None:
        comps = build_tiny_components(0, device=device, dtype=_dtype(args.dtype), ctx=ctx)  # fixed weights; --seed is the noise
    else:
        comps = build_checkpoint_components(files, device=device, dtype=_dtype(args.dtype), ctx=ctx)
    _speed_options(args, comps)
    return comps


def _check_speed_args(args, files) -> None:
    """--fp8 needs a GPU with fp8 tensor cores and no LoRA to fuse: checked before anything is built."""
    if not args.fp8:
        return
    if not str(args.device).startswith("cuda") or not torch.cuda.is_available():
        raise UsageError(f"--fp8: needs a CUDA device (torch._scaled_mm), got --device {args.device}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise UsageError(f"--fp8: needs compute capability >= 8.9 (Ada / Hopper), this GPU has {major}.{minor}")
    if files is not None and files.distilled_lora:
        raise UsageError(f"--fp8: not supported with a stage-2 distilled LoRA ({files.distilled_lora}), which is "
                         "fused into the bf16 weights for stage 2")


def _speed_options(args, comps) -> None:
    """--fp8 quantizes the block linears (layers/fp8.py); --enable-torch-compile compiles each block
    (the first request at each resolution pays the compilation: minutes at full size)."""
    if args.fp8:
        from ltx2_tp.layers.fp8 import quantize_fp8

        quantize_fp8(comps.transformer)
    if args.enable_torch_compile:
        from ltx2_tp.compile import compile_blocks

        compile_blocks(comps.transformer)


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, default=1, help="ranks (launch with torchrun --nproc-per-node N)")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--sp-size", type=int, default=1, help="sequence parallel = Ulysses x ring")
    p.add_argument("--ulysses-size", type=int, default=None, help="default: --sp-size / --ring-size")
    p.add_argument("--ring-size", type=int, default=1)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="folder with the official LTX-2 files, or the checkpoint file")
    p.add_argument("--spatial-upsampler-path", default=None, help="default: *spatial-upscaler*.safetensors beside it")
    p.add_argument("--text-encoder-path", default=None, help="Gemma 3 folder (default: gemma* beside it); "
                   "'tiny' = the embedded stand-in")
    p.add_argument("--distilled-lora-path", default=None, help="stage-2 LoRA (default: *distilled-lora* beside it)")
    p.add_argument("--distilled-lora-strength", type=float, default=1.0)


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-torch-compile", action="store_true",
                   help="torch.compile each DiT block (first request per resolution compiles: minutes at full size)")
    p.add_argument("--fp8", action="store_true", help="fp8 block linears (torch._scaled_mm; GPU with CC >= 8.9)")


def _check_image(path: str) -> None:
    """--image-path names a readable image: its header and checksums are read, nothing is decoded."""
    import os

    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise UsageError(f"--image-path: no such file {path!r}")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UsageError(f"--image-path: not an image (PNG, JPEG, WebP): {path!r}") from None


def _check_device(args) -> None:
    """--device is a torch device this machine has: checked before anything is built."""
    dev = getattr(args, "device", None)
    if dev is None:
        return
    try:
        kind = torch.device(dev).type
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {dev!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {dev}: no CUDA device is available on this machine; use --device cpu")


def _add_device_args(p: argparse.ArgumentParser, cpu_dtype: str) -> None:
    gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--dtype", default="bf16" if gpu else cpu_dtype, choices=["bf16", "fp16", "fp32"])


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default (also where the flag has no help text; not None / off)."""

    def _format_action(self, action):
        if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltx2-tp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text/image to video with audio (flags named as sglang's)",
                       formatter_class=_HelpWithDefaults)
    g.add_argument("--model", default="tiny", help="tiny (embedded; makes noise, not pictures)")
    _add_checkpoint_args(g)
    g.add_argument("--pipeline-class-name", default="LTX2LongVideo", choices=["LTX2LongVideo", "LTX2TwoStagePipeline"])
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--image-path", default=None, help="first-frame image (image-to-video)")
    g.add_argument("--width", type=int, default=384)
    g.add_argument("--height", type=int, default=256)
    g.add_argument("--num-frames", type=int, default=49)
    g.add_argument("--fps", type=float, default=24.0)
    g.add_argument("--num-inference-steps", type=int, default=8)
    g.add_argument("--guidance-scale", type=float, default=3.0)
    g.add_argument("--seed", type=int, default=0)
    _add_layout_args(g)
    _add_speed_args(g)
    g.add_argument("--output-path", default="outputs/ltx2_tp.mp4")
    g.add_argument("--output-format", default=None, choices=["mp4", "webm", "gif"], help="default: from --output-path")
    _add_device_args(g, cpu_dtype="fp32")
    g.set_defaults(func=cmd_generate)
    sv = sub.add_parser("serve", help="OpenAI-compatible /v1/videos server", formatter_class=_HelpWithDefaults)
    sv.add_argument("--model", default="tiny")
    _add_checkpoint_args(sv)
    sv.add_argument("--served-model-name", default="ltx-2-tiny")
    sv.add_argument("--pipeline-class-name", default="LTX2LongVideo", choices=["LTX2LongVideo", "LTX2TwoStagePipeline"])
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--output-dir", default="outputs/server")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route")
    sv.add_argument("--max-queue", type=int, default=8, help="queued jobs beyond the running one; more get 429")
    sv.add_argument("--ttl-s", type=int, default=3600, help="finished jobs and their files are deleted after this "
                    "many seconds (also across restarts)")
    sv.add_argument("--max-video-tokens", type=int, default=400_000, help="larger requests get 400 (memory plan)")
    sv.add_argument("--max-upload-bytes", type=int, default=10 * 2**20, help="input_reference larger than this: 413")
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                    help="input_reference with more pixels: 400 (read from the header, before decoding)")
    sv.add_argument("--max-prompt-chars", type=int, default=10_000, help="longer prompts: 400")
    sv.add_argument("--collective-timeout-s", type=float, default=600,
                    help="several ranks: a DiT collective whose peer failed gives up after this long")
    sv.add_argument("--num-inference-steps", type=int, default=8, help="default when a request gives none")
    _add_layout_args(sv)
    _add_speed_args(sv)
    _add_device_args(sv, cpu_dtype="fp32")
    sv.set_defaults(func=cmd_serve)
    d = sub.add_parser("dit", help="one DiT forward with random weights: shapes and time", formatter_class=_HelpWithDefaults)
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
    _add_device_args(d, cpu_dtype="bf16")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--repeat", type=int, default=2)
    d.set_defaults(func=cmd_dit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "sp_size"):  # dit, generate: SP = Ulysses x ring, Ulysses by default
            if args.ulysses_size is None:
                args.ulysses_size = max(1, args.sp_size // args.ring_size)
            if args.ulysses_size * args.ring_size != args.sp_size:
                raise UsageError(f"--sp-size ({args.sp_size}) must equal --ulysses-size x --ring-size "
                                 f"({args.ulysses_size} x {args.ring_size})")
        _check_device(args)
        return args.func(args)
    except ValueError as e:  # UsageError, config validation, layout errors
        print(f"ltx2-tp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
