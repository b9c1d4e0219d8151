"""`ltx2-tp` command line.

  ltx2-tp generate --model tiny --prompt "a red fox" --output-path outputs/fox.mp4
  ltx2-tp dit --model tiny                 one DiT forward (random weights): shapes and time
  torchrun --nproc-per-node 2 -m ltx2_tp.cli dit --model ltx-2-19b --tp-size 2 --device cuda ...

Bad values stop with a message naming the flag and the allowed values, before any model is built.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

from ltx2_tp.models.ltx2.config import PRESETS


class UsageError(ValueError):
    pass


def _flag_error(e) -> UsageError:
    """A RequestError (field name) as the CLI says it (flag name)."""
    return UsageError(f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}")


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def cmd_dit(args) -> int:
    from ltx2_tp.distributed.context import init_parallel
    from ltx2_tp.latent_grid import SPATIAL_SCALE
    from ltx2_tp.memory.plan import ExecutionPlan
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.models.ltx2.quantization import build_transformer
    from ltx2_tp.pipelines.request import RequestError, check_video_size
    from ltx2_tp.step_inputs import synthetic_step_inputs

    try:  # the DiT alone: multiples of 32 (the pipelines, with a half-size stage 1, need 64)
        check_video_size(args.num_frames, args.height, args.width, SPATIAL_SCALE)
        _check_window_flag(args)
    except RequestError as e:
        raise _flag_error(e) from None
    cfg = get_config(args.model)
    cfg.validate_parallel(args.tp_size, args.ulysses_size)
    _check_quantization(args, None)
    ctx = init_parallel(args.tp_size, args.ulysses_size, args.ring_size)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    dtype = _dtype(args.dtype)
    t0 = time.perf_counter()
    model = build_transformer(cfg, ctx, device=device, dtype=dtype, seed=args.seed, quantization=args.quantization)
    t_build = time.perf_counter() - t0
    video, audio = synthetic_step_inputs(cfg, args.num_frames, args.height, args.width, args.fps, device, dtype,
                                         seed=args.seed)
    if args.ffn_chunk_tokens or args.attn_chunk_tokens:
        plan = ExecutionPlan(args.ffn_chunk_tokens, args.attn_chunk_tokens, cache_rope=not args.attn_chunk_tokens)
    else:  # what the model derives by itself for the tokens an SP rank holds
        plan = model.execution_plan(video.latent.shape[1])
    if args.attention_window_frames is not None:  # the opt-in approximation
        plan = dataclasses.replace(plan, attention_window_frames=args.attention_window_frames)
    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        vx, ax = model(video, audio, plan=plan)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        print(f"model={args.model} layout[{ctx.describe()}] plan[{plan.describe()}] device={device} dtype={args.dtype}"
              f"{f' quantization={args.quantization}' if args.quantization else ''}")
        print(f"video latent {tuple(video.latent.shape)} -> velocity {tuple(vx.shape)}")
        if ax is not None:
            print(f"audio latent {tuple(audio.latent.shape)} -> velocity {tuple(ax.shape)}")
        print(f"build {t_build:.2f} s; forward s/step: " + ", ".join(f"{x:.4f}" for x in times))
        if device.type == "cuda":
            print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


def cmd_plan(args) -> int:
    """The planner's table for one request (memory/planner.py); nothing is allocated. Exits 1 with
    one line naming the smallest change when nothing fits."""
    from ltx2_tp.memory.planner import Layout, PlanError, parse_bytes
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.pipelines.planning import plan_pipeline
    from ltx2_tp.pipelines.registry import get_pipeline_class, pipeline_names
    from ltx2_tp.pipelines.request import GenerationRequest, RequestError

    from ltx2_tp.pipelines.registry import resolve_pipeline_name

    name = resolve_pipeline_name(args.pipeline_class_name)
    if name is None:
        raise UsageError(f"--pipeline-class-name: unknown pipeline {args.pipeline_class_name!r}; "
                         f"allowed: {', '.join(pipeline_names())}")
    cls = get_pipeline_class(name)
    cfg = get_config(args.model)
    try:  # the pipeline's own size checks (two-stage: multiples of 64, stage 1 runs at half size)
        cls.check_request(GenerationRequest(prompt="plan", width=args.width, height=args.height,
                                            num_frames=args.num_frames, fps=args.fps), cfg.num_layers)
    except RequestError as e:
        raise _flag_error(e) from None
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    cap = parse_bytes(args.max_gpu_memory)
    if args.layers:
        if not 1 <= args.layers <= cfg.num_layers:
            raise UsageError(f"--layers must be in [1, {cfg.num_layers}], got {args.layers}")
        cfg = cfg.replace(num_layers=args.layers)
    layout = None
    if args.tp_size is not None:
        if args.num_gpus % args.tp_size:
            raise UsageError(f"--tp-size ({args.tp_size}) must divide --num-gpus ({args.num_gpus})")
        sp = args.num_gpus // args.tp_size
        u = args.ulysses_size or sp // args.ring_size
        if u * args.ring_size != sp:
            raise UsageError(f"--num-gpus / --tp-size ({sp}) must equal --ulysses-size x --ring-size "
                             f"({u} x {args.ring_size})")
        cfg.validate_parallel(args.tp_size, u)
        layout = Layout(args.tp_size, u, args.ring_size)
    resident = None
    if args.resident_blocks not in (None, "auto"):
        try:
            resident = int(args.resident_blocks)
        except ValueError:
            raise UsageError(f"--resident-blocks: expected auto or an integer, got {args.resident_blocks!r}") from None
    try:
        plan = plan_pipeline(cfg, cls, width=args.width, height=args.height, num_frames=args.num_frames, fps=args.fps,
                             cap=cap, num_gpus=args.num_gpus, layout=layout, storage=args.quantization,
                             resident_blocks=resident, model=args.model)
    except PlanError as e:
        print(f"ltx2-tp plan: does not fit: {e}", file=sys.stderr)
        return 1
    print(plan.table())
    return 0


def cmd_generate(args) -> int:
    from ltx2_tp.pipelines.planning import apply_plan
    from ltx2_tp.pipelines.registry import get_pipeline_class, pipeline_names, resolve_pipeline_name
    from ltx2_tp.pipelines.request import GenerationRequest, RequestError

    name = resolve_pipeline_name(args.pipeline_class_name)  # a class name or its alias (registry.ALIASES)
    if name is None:
        raise UsageError(f"--pipeline-class-name: unknown pipeline {args.pipeline_class_name!r}; "
                         f"allowed: {', '.join(pipeline_names())}")
    cls = get_pipeline_class(name)
    files = _checkpoint_files(args)
    cfg = _check_layout(args, files)
    steps = args.num_inference_steps  # default: the pipeline's for the model (ltx-pipelines' PipelineParams)
    if steps is None:
        steps = cls.default_params(cfg, files.checkpoint if files else None, files is None).num_inference_steps
    fmt = args.output_format or (args.output_path.rsplit(".", 1)[-1].lower() if "." in args.output_path else "mp4")
    prompt, prompts, schedule = _prompts(args)
    req = GenerationRequest(prompt=prompt, prompts=prompts, negative_prompt=args.negative_prompt, width=args.width,
                            height=args.height, num_frames=args.num_frames, fps=args.fps, num_inference_steps=steps,
                            guidance_scale=args.guidance_scale, seed=args.seed, image_path=args.image_path,
                            output_format=fmt, **{k: getattr(args, k) for k in REQUEST_FLAGS},
                            **({"prompt_schedule": schedule} if schedule else {}))
    if args.image_path:
        _check_image(args.image_path)
    if args.lora and not os.path.isfile(args.lora[0]):
        raise UsageError(f"--lora: no such file {args.lora[0]!r}")
    try:  # every value checked before anything is built
        cls.check_request(req, cfg.num_layers)
        from ltx2_tp.pipelines.approximations import check_layout

        check_layout(req, args.ring_size)
    except RequestError as e:
        raise _flag_error(e) from None
    _check_guidance_groups(args, cls, req, cfg, files)
    _check_speed_args(args, files)
    _check_memory_args(args, cfg, files)
    plan = _request_plan(args, cfg, cls, req) if args.max_gpu_memory else None
    if plan is not None and isinstance(args.resident_blocks, str):  # auto: the plan's
        args.resident_blocks = plan.resident_blocks
    if plan is not None and plan.text_encoder_on_host:
        args.text_encoder_device = "cpu"
    stream, encoder = _decode_settings(args)

    from tqdm import tqdm

    from ltx2_tp.pipelines.stages import StageTimer
    from ltx2_tp.serving.ranks import run_on_rank, this_rank

    comps = _components(args, files)
    pipe = cls(comps, **_pipeline_options(cls, args))
    pipe.stream_decode, pipe.encoder_options = stream, encoder
    apply_plan(plan, comps)
    rank0 = this_rank() == 0
    bars: dict[str, tqdm] = {}
    choose = getattr(pipe, "choose_mode", None)
    if rank0 and choose is not None:
        print(choose(req).describe(), flush=True)

    def progress(stage: str, done: int, total: int) -> None:
        if not rank0 or stage == "done":
            return
        kind = stage.rsplit(" ", 1)[-1]  # a tiled long video's "tile 3/10 stage1": one bar per kind, per tile
        if kind not in bars:
            bars[kind] = tqdm(total=total, desc=stage, unit="step")
        elif done == 0 and stage != bars[kind].desc.rstrip(": "):
            bars[kind].reset(total=total)
            bars[kind].set_description(stage)
        bars[kind].update(done - bars[kind].n)

    timer = StageTimer(sync=comps.device.type == "cuda", memory=comps.device.type == "cuda")
    try:
        result = run_on_rank(pipe, req, args.output_path, this_rank(), progress=progress, timer=timer)
    except RequestError as e:  # what only the built pipeline can check (it runs before anything else)
        raise _flag_error(e) from None
    for b in bars.values():
        b.close()
    memory = _memory_report(plan, comps.device, timer)
    if result is None:  # not rank 0
        return 0
    print(timer.table())
    from ltx2_tp.pipelines.approximations import describe

    for line in describe(result.approximations):
        print(line)
    if memory:
        print(memory)
    print(f"wrote {result.path} ({result.frames} frames {result.width}x{result.height} @ {result.fps:g} fps, "
          f"{result.audio_samples} audio samples)")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from ltx2_tp.pipelines.planning import CapCheck, apply_plan
    from ltx2_tp.pipelines.registry import get_pipeline_class, resolve_pipeline_name
    from ltx2_tp.serving.api import create_app
    from ltx2_tp.serving.events import log_to_stderr
    from ltx2_tp.serving.jobs import JobManager
    from ltx2_tp.serving.pipelines import ServedPipelines, unservable
    from ltx2_tp.serving.ranks import ControlChannel, ControlLost, LeaderPipeline, RankSync, follow

    for flag, v, lo in (("--max-queue", args.max_queue, 1), ("--ttl-s", args.ttl_s, 1),
                        ("--max-upload-bytes", args.max_upload_bytes, 1), ("--max-image-pixels", args.max_image_pixels, 1),
                        ("--max-media-upload-bytes", args.max_media_upload_bytes, 1),
                        ("--max-prompt-chars", args.max_prompt_chars, 1), ("--max-video-tokens", args.max_video_tokens, 1),
                        ("--max-frames", args.max_frames, 1),
                        ("--collective-timeout-s", args.collective_timeout_s, 1), ("--port", args.port, 0)):
        if v < lo:
            raise UsageError(f"{flag} must be at least {lo}, got {v}")
    if args.num_inference_steps is not None and not 1 <= args.num_inference_steps <= 200:
        raise UsageError(f"--num-inference-steps must be between 1 and 200, got {args.num_inference_steps}")
    from ltx2_tp.serving.ic_loras import ICLoras

    try:  # names and files checked before anything is built (the weights are read on first use)
        ic_loras = ICLoras.parse(args.ic_lora)
    except ValueError as e:
        raise UsageError(f"--ic-lora: {e}") from None
    default = resolve_pipeline_name(args.pipeline_class_name)
    if default is None or unservable(get_pipeline_class(default)):
        raise UsageError(f"--pipeline-class-name: {args.pipeline_class_name!r} is not a pipeline this server runs; "
                         f"allowed: {', '.join(_served_names())}")
    warmup = []
    if args.warmup:
        from ltx2_tp.serving.params import Limits
        from ltx2_tp.serving.warmup import warmup_requests

        warmup_limits = Limits(model_name=args.served_model_name, default_steps=args.num_inference_steps,
                               max_frames=args.max_frames, max_video_tokens=args.max_video_tokens,
                               max_prompt_chars=args.max_prompt_chars)
        try:  # the generic checks before anything is built; the served pipeline's own once it is
            warmup = warmup_requests(args.warmup, warmup_limits,
                                     spatial_multiple=get_pipeline_class(default).spatial_multiple)
        except ValueError as e:
            raise UsageError(f"--warmup: {e}") from None
    if args.compile_cache_dir is None:  # beside the jobs, so a restarted server finds its compiled graphs
        from pathlib import Path

        args.compile_cache_dir = str(Path(args.output_dir) / "compile_cache")
    files = _checkpoint_files(args)
    cfg = _check_layout(args, files)
    cls = get_pipeline_class(default)
    if args.guidance_parallel_size > 1 and not cls.guided:
        raise UsageError(f"--guidance-parallel-size {args.guidance_parallel_size}: {cls.name} runs no guidance; use 1")
    _check_speed_args(args, files)
    _check_memory_args(args, cfg, files)
    cap = _server_cap(args, cfg, cls) if args.max_gpu_memory else None
    stream, encoder = _decode_settings(args)
    comps = _components(args, files)
    if cap is not None:  # before the pipelines are built: every job runs under the plan's activation budget
        apply_plan(cap.plan(64, 64, 1, 24.0), comps)  # the budget depends on the weights only
        cap = CapCheck.built(comps, cls, cap.cap)  # requests are checked as jobs decide: the components as built
    pipe = ServedPipelines(comps, default, args.served_model_name, args.num_inference_steps, encoder,
                           stream_decode=stream, fixed_plan_rule=cap is not None, ic_loras=ic_loras)
    if args.warmup:  # again, as the API checks them: the served pipeline's size rule, the cap
        import dataclasses

        from ltx2_tp.serving.warmup import warmup_requests

        try:
            warmup = warmup_requests(args.warmup, dataclasses.replace(warmup_limits, cap=cap), pipe)
        except ValueError as e:
            raise UsageError(f"--warmup: {e}") from None
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
    manager = JobManager(pipe, args.output_dir, args.max_queue, args.ttl_s, warmup=warmup)
    app = create_app(manager, model_name=args.served_model_name, api_key=args.api_key,
                     max_video_tokens=args.max_video_tokens, max_frames=args.max_frames,
                     max_upload_bytes=args.max_upload_bytes, max_prompt_chars=args.max_prompt_chars,
                     max_image_pixels=args.max_image_pixels, cap=cap,
                     max_media_upload_bytes=args.max_media_upload_bytes,
                     pipelines=pipe.pipeline if isinstance(pipe, LeaderPipeline) else pipe)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    status = [0]

    def fatal(e: BaseException) -> None:  # the ranks can no longer work together: stop (torchrun may restart)
        print(f"ltx2-tp: error: {e}", file=sys.stderr, flush=True)
        status[0] = 1
        server.should_exit = True

    manager.on_fatal = fatal
    if manager.warmup_error is not None:  # it failed before on_fatal was set
        fatal(RuntimeError(f"--warmup failed: {manager.warmup_error}"))
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


def _served_names() -> list[str]:
    from ltx2_tp.pipelines.registry import get_pipeline_class, pipeline_names
    from ltx2_tp.serving.pipelines import unservable

    return [n for n in pipeline_names() if unservable(get_pipeline_class(n)) is None]


def _check_layout(args, files):
    """--num-gpus = G x TP x SP, and TP / Ulysses must divide the heads: checked before anything is
    built. Returns the DiT's config."""
    from ltx2_tp.models.ltx2.config import LTX2Config, get_config

    g = args.guidance_parallel_size
    from ltx2_tp.pipelines.guidance import PASS_NAMES

    if not 1 <= g <= len(PASS_NAMES):
        raise UsageError(f"--guidance-parallel-size must be between 1 and {len(PASS_NAMES)} (a step has at most "
                         f"{len(PASS_NAMES)} guidance passes: {', '.join(PASS_NAMES)}), got {g}")
    if g == 1 and args.tp_size * args.sp_size != args.num_gpus:
        raise UsageError(f"--num-gpus ({args.num_gpus}) must equal --tp-size x --sp-size ({args.tp_size} x {args.sp_size})")
    if g > 1:
        if args.num_gpus % g:
            raise UsageError(f"--guidance-parallel-size ({g}) must divide --num-gpus ({args.num_gpus})")
        if g * args.tp_size * args.sp_size != args.num_gpus:
            raise UsageError(f"--num-gpus ({args.num_gpus}) must equal --guidance-parallel-size x --tp-size x --sp-size "
                             f"({g} x {args.tp_size} x {args.sp_size})")
    if files is None:
        cfg = get_config("tiny")
    else:
        from ltx2_tp.models.ltx2.weights import read_checkpoint_config

        meta = read_checkpoint_config([files.checkpoint]) or {}
        cfg = LTX2Config.from_checkpoint_config(meta)
    cfg.validate_parallel(args.tp_size, args.ulysses_size)
    return cfg


def _check_guidance_groups(args, cls, req, cfg, files) -> None:
    """--guidance-parallel-size G: at most one group per guidance pass of the request's guided steps
    (a pipeline without guidance has one pass: G must be 1)."""
    g = args.guidance_parallel_size
    if g == 1:
        return
    if not cls.guided:
        raise UsageError(f"--guidance-parallel-size {g}: {cls.name} runs no guidance (one DiT pass a step); use 1")
    from ltx2_tp.pipelines.guidance import passes_per_step, request_guidance

    params = cls.default_params(cfg, files.checkpoint if files else None, files is None)
    n = passes_per_step(*request_guidance(req, params, cfg.num_layers))
    if g > n:
        raise UsageError(f"--guidance-parallel-size {g}: this request runs {n} guidance pass(es) a step "
                         f"(cond, then uncond if a CFG scale != 1, perturbed if an STG scale != 0, isolated if a "
                         f"modality scale != 1): at most {n} groups")


# request fields that `generate` takes as flags of the same name (ltx-pipelines' argument names)
REQUEST_FLAGS = ("video_stg_guidance_scale", "video_rescale_scale", "video_stg_blocks", "a2v_guidance_scale",
                 "video_skip_step", "audio_cfg_guidance_scale", "audio_stg_guidance_scale", "audio_rescale_scale",
                 "audio_stg_blocks", "v2a_guidance_scale", "audio_skip_step", "images", "video_path", "start_time",
                 "end_time", "video_conditioning", "conditioning_attention_strength", "audio_path", "audio_start_time",
                 "audio_max_duration", "attention_window_frames", "keyframe_stride", "step_cache_threshold",
                 "long_video_mode", "tile_frames", "tile_overlap_frames", "tile_cond_strength", "adain_factor")
FIELD_FLAGS = {"images": "--image", "prompts": "--prompt"}  # request fields whose flag is not --field-name


def _prompts(args) -> tuple[str, list[str], str | None]:
    """(prompt, per-tile prompts, schedule text) from --prompt (repeatable), --prompt-file, --prompt-schedule.
    A prompt file holds one prompt per line (one per tile), or, when every line reads "SECONDS: prompt",
    a schedule by time."""
    import re

    given = list(args.prompt or [])
    schedule = args.prompt_schedule
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-file: cannot read {args.prompt_file!r}: {e}") from None
        if not lines:
            raise UsageError(f"--prompt-file: {args.prompt_file!r} has no prompt")
        if given or schedule:
            raise UsageError("--prompt-file: give the prompts in the file or with --prompt / --prompt-schedule, not both")
        if all(re.match(r"^\d+(\.\d*)?\s*:", line) for line in lines):
            schedule = "\n".join(lines)
        else:
            given = lines
    if not given and not schedule:
        raise UsageError("--prompt: required (or --prompt-file, or --prompt-schedule)")
    if schedule and not given:  # the request's prompt: the schedule's first
        from ltx2_tp.pipelines.request import RequestError, parse_prompt_schedule

        try:
            given = [parse_prompt_schedule(schedule)[0][1]]
        except RequestError as e:
            raise _flag_error(e) from None
    return given[0], given if len(given) > 1 else [], schedule


def _flag_error(e) -> UsageError:
    flag = FIELD_FLAGS.get(e.field, "--" + e.field.replace("_", "-"))
    return UsageError(f"{flag}: {str(e).split(': ', 1)[1]}")


def _check_window_flag(args) -> None:
    """`dit --attention-window-frames`: its range, and no ring attention (RequestError naming the field)."""
    from ltx2_tp.pipelines.request import RequestError, check_attention_window

    check_attention_window(args.attention_window_frames)
    if args.attention_window_frames is not None and args.ring_size > 1:
        raise RequestError("attention_window_frames", f"not supported with ring attention (--ring-size "
                           f"{args.ring_size}); use --ulysses-size")


def _add_approximation_args(p: argparse.ArgumentParser, pipeline: bool = True) -> None:
    """Opt-in approximations: off unless given; their measured deviation is in the README, and
    benchmark/quality.py measures it on real weights."""
    g = p.add_argument_group("approximations (opt-in; change the output: README 'Approximations')")
    g.add_argument("--attention-window-frames", type=int, default=None, metavar="K",
                   help="APPROXIMATION: video self-attention sees only latent frames within K of the query's "
                   "(plus conditioning frames); not with --ring-size > 1")
    if pipeline:
        g.add_argument("--keyframe-stride", type=int, default=1, metavar="S",
                       help="APPROXIMATION: stage 1 denoises every S-th latent frame (and the last); the frames "
                       "between are interpolated before stage 2 refines all (two-stage pipelines)")
        g.add_argument("--step-cache-threshold", type=float, default=0.0, metavar="T",
                       help="APPROXIMATION: reuse the previous step's DiT output while block 0's modulated input "
                       "changed by less than T in sum (TeaCache-style; 0: off)")


def _pipeline_options(cls, args) -> dict:
    """The constructor options a pipeline takes (IC-LoRA file, HQ LoRA strengths), from their flags."""
    import inspect

    given = {"lora_path": args.lora[0] if args.lora else None,
             "lora_strength": float(args.lora[1]) if args.lora and len(args.lora) > 1 else 1.0,
             "distilled_lora_strength_stage_1": args.distilled_lora_strength_stage_1,
             "distilled_lora_strength_stage_2": args.distilled_lora_strength_stage_2}
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in given.items() if k in params and v is not None}


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
        raise _flag_error(e) from None


def _components(args, files):
    """Join the torchrun ranks (if any), then build the components on this rank's device."""
    from ltx2_tp.distributed.context import init_parallel
    from ltx2_tp.pipelines.checkpoints import build_checkpoint_components
    from ltx2_tp.pipelines.tiny import build_tiny_components

    ctx = init_parallel(args.tp_size, args.ulysses_size, args.ring_size, guidance_size=args.guidance_parallel_size)
    device = args.device
    if device == "cuda" and ctx.is_parallel:
        device = f"cuda:{torch.cuda.current_device()}"

    resident = getattr(args, "resident_blocks", None)
    if files is None:
        comps = build_tiny_components(0, device=device, dtype=_dtype(args.dtype), ctx=ctx)  # fixed weights; --seed is the noise
    else:  # an fp8 checkpoint loads as stored; a conversion happens block by block while loading
        comps = build_checkpoint_components(files, device=device, dtype=_dtype(args.dtype), ctx=ctx,
                                            quantization=args.quantization, resident_blocks=resident,
                                            source=getattr(args, "weight_source", "host"),
                                            text_encoder_device=getattr(args, "text_encoder_device", None))
    _speed_options(args, comps, converted=files is not None)
    if files is None and resident is not None:  # after quantizing (what streams is what runs)
        from ltx2_tp.memory.swap import enable_block_swap

        enable_block_swap(comps.transformer, resident, "host", device=comps.device)
    return comps


# ---- GPU memory cap (memory/planner.py) -------------------------------------------------------------
def _check_memory_args(args, cfg, files) -> None:
    """--max-gpu-memory -> bytes, --resident-blocks -> K, 'auto' or None, --weight-source against
    them and the checkpoint: checked before anything is built."""
    from ltx2_tp.memory.planner import parse_bytes

    if args.max_gpu_memory is not None:
        args.max_gpu_memory = parse_bytes(args.max_gpu_memory)  # a bad size names the flag
    k = args.resident_blocks
    if k is not None and k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise UsageError(f"--resident-blocks: expected auto or an integer in [0, {cfg.num_layers}], got {k!r}") from None
        if not 0 <= k <= cfg.num_layers:
            raise UsageError(f"--resident-blocks must be in [0, {cfg.num_layers}] (the model's blocks), got {k}")
    if k == "auto" and args.max_gpu_memory is None:
        raise UsageError("--resident-blocks auto needs --max-gpu-memory (the budget the resident blocks fill)")
    if k is None and args.max_gpu_memory is not None:
        k = "auto"
    args.resident_blocks = k
    if args.weight_source == "file":
        if k is None:
            raise UsageError("--weight-source file streams blocks: give --resident-blocks K or --max-gpu-memory")
        if files is None:
            raise UsageError("--weight-source file reads the checkpoint: it needs --model-path (the tiny model is "
                             "embedded, not a file)")
        from ltx2_tp.models.ltx2.quantization import inspect_checkpoint

        if args.quantization and inspect_checkpoint([files.checkpoint]).kind is None:
            raise UsageError(f"--weight-source file: --quantization {args.quantization} converts a bf16 checkpoint "
                             "in memory, so its streamed blocks come from host memory (--weight-source host)")
    if args.max_gpu_memory is not None and str(args.device).startswith("cuda") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if args.max_gpu_memory > total:
            raise UsageError(f"--max-gpu-memory ({args.max_gpu_memory / 2**30:.2f} GiB) is more than this GPU has "
                             f"({total / 2**30:.2f} GiB)")


def _request_plan(args, cfg, cls, req):
    """The planner's plan of this request in the launch layout, for what it holds at once
    (planning.request_plan: the whole video, or one tile when LTX2LongVideo will tile it); a
    refusal names the smallest change."""
    from ltx2_tp.memory.planner import Layout
    from ltx2_tp.pipelines.planning import CapCheck, OverCap, request_plan
    from ltx2_tp.pipelines.request import RequestError

    check = CapCheck(cfg, cls, args.max_gpu_memory, Layout(args.tp_size, args.ulysses_size, args.ring_size),
                     args.quantization, None if isinstance(args.resident_blocks, str) else args.resident_blocks,
                     args.model, _dtype(args.dtype).itemsize)
    try:
        return request_plan(check, req).plan
    except OverCap as e:
        tile = "" if e.frames == req.num_frames else f"one tile ({e.frames} frames, --tile-frames) of the tiled video: "
        raise UsageError(f"--max-gpu-memory: {tile}{e.error}") from None
    except RequestError as e:  # tiled: images past the first tile
        raise _flag_error(e) from None


def _server_cap(args, cfg, cls):
    """The server's fixed plan inputs; --resident-blocks auto streams every block (the most room for a
    request's activations: `ltx2-tp plan` shows what a larger K leaves)."""
    from ltx2_tp.memory.planner import Layout, PlanError
    from ltx2_tp.pipelines.planning import CapCheck

    if isinstance(args.resident_blocks, str):
        args.resident_blocks = 0
    cap = CapCheck(cfg, cls, args.max_gpu_memory, Layout(args.tp_size, args.ulysses_size, args.ring_size),
                   args.quantization, args.resident_blocks, args.model, _dtype(args.dtype).itemsize)
    try:
        if cap.plan(64, 64, 1, 24.0).text_encoder_on_host:
            args.text_encoder_device = "cpu"
    except PlanError as e:
        raise UsageError(f"--max-gpu-memory: even the smallest request does not fit ({e})") from None
    return cap


def _memory_report(plan, device, timer) -> str:
    """Every rank's memory per stage (CUDA: allocated when the stage starts, its peak: the timer's),
    and with a plan its predicted DiT peak per rank beside the measured one. Collective on every rank."""
    lines = []
    if device.type == "cuda" and timer.mem:
        names = list(timer.mem)
        mine = torch.tensor([x for n in names for x in timer.mem[n]], dtype=torch.float64, device=device)
        ranks = [mine]
        if torch.distributed.is_initialized():  # every rank ran the same stages, in the same order
            ranks = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(ranks, mine)
        lines.append("memory per rank, GiB (allocated when the stage starts / peak inside it):")
        for i, n in enumerate(names):
            lines.append(f"  {n:<20} " + ", ".join(f"r{r}: {t[2 * i].item() / 2**30:.2f} / {t[2 * i + 1].item() / 2**30:.2f}"
                                                    for r, t in enumerate(ranks)))
    if plan is None:
        return "\n".join(lines)
    lines.append(f"memory plan: {plan.layout.describe()}, {plan.resident_blocks} resident / {plan.streamed_blocks} "
                 f"streamed blocks, cap {plan.cap / 2**30:.2f} GiB per GPU")
    for p in plan.dit_phases:
        lines.append(f"  {p.name}: predicted peak {p.peak / 2**30:.2f} GiB per rank")
    if device.type == "cuda" and timer.mem:
        peaks = [max(t[1::2].tolist()) for t in ranks]
        lines.append("  measured peak per rank (whole request): " + ", ".join(f"{x / 2**30:.2f}" for x in peaks)
                     + f" GiB; predicted {plan.peak / 2**30:.2f}")
    else:
        lines.append("  measured: nothing recorded (CPU, or no stage ran): the prediction only")
    return "\n".join(lines)


def _check_speed_args(args, files) -> None:
    """--quantization / --fp8 against the checkpoint, the device and the LoRA: checked before anything is built."""
    _check_quantization(args, files)


def _check_quantization(args, files) -> None:
    """Resolve args.quantization (the flag, --fp8, or what an fp8 checkpoint holds); the fp8 matmuls
    need a GPU with fp8 tensor cores, and take no LoRA (fp8-cast does)."""
    from ltx2_tp.models.ltx2.quantization import BF16_FORMAT, FP8_MATMUL, inspect_checkpoint, resolve

    requested = args.quantization
    if getattr(args, "fp8", False):
        if requested not in (None, "fp8-rowwise"):
            raise UsageError(f"--fp8 is --quantization fp8-rowwise; it conflicts with --quantization {requested}")
        requested = "fp8-rowwise"
    fmt = inspect_checkpoint([files.checkpoint]) if files is not None else BF16_FORMAT
    try:
        args.quantization = resolve(requested, fmt)  # a refusal names --quantization and the allowed values
    except ValueError as e:
        raise UsageError(f"--fp8 ({e})" if getattr(args, "fp8", False) else str(e)) from None
    if args.quantization not in FP8_MATMUL:
        return
    if getattr(args, "fp8", False):
        who = "--fp8:"
    elif requested is not None:
        who = f"--quantization {requested}:"
    else:
        who = f"--model-path {files.checkpoint}: an fp8 checkpoint ({fmt.describe()}) runs fp8 matmuls, which"
    hint = "; --quantization fp8-cast runs it with bf16 compute (fp8 storage)" if fmt.kind else ""
    if not str(args.device).startswith("cuda") or not torch.cuda.is_available():
        raise UsageError(f"{who} needs a CUDA device (torch._scaled_mm), got --device {args.device}{hint}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise UsageError(f"{who} needs compute capability >= 8.9 (Ada / Hopper), this GPU has {major}.{minor}{hint}")
    if files is not None and files.distilled_lora:
        raise UsageError(f"{who} not supported with a stage-2 distilled LoRA ({files.distilled_lora}), which is "
                         "fused into the weights for stage 2; --quantization fp8-cast fuses it into fp8 storage "
                         "(as ltx-core)")


def _speed_options(args, comps, converted: bool = False) -> None:
    """--quantization of the embedded tiny model (a checkpoint's is applied while loading: `converted`);
    --enable-torch-compile compiles each block (the first request at each resolution pays the
    compilation: minutes at full size)."""
    if args.quantization and not converted:
        from ltx2_tp.models.ltx2.quantization import quantize_model

        quantize_model(comps.transformer, args.quantization)
    if args.quantization:
        from ltx2_tp.models.ltx2.quantization import describe

        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"DiT weights: {describe(comps.transformer)}", file=sys.stderr)
    if args.enable_torch_compile:
        from ltx2_tp.compile import compile_blocks, use_compile_cache

        if args.compile_cache_dir:
            use_compile_cache(args.compile_cache_dir)
        compile_blocks(comps.transformer)


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, default=1, help="ranks (launch with torchrun --nproc-per-node N)")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--sp-size", type=int, default=1, help="sequence parallel = Ulysses x ring")
    p.add_argument("--ulysses-size", type=int, default=None, help="default: --sp-size / --ring-size")
    p.add_argument("--ring-size", type=int, default=1)
    _add_guidance_parallel_args(p)


def _add_guidance_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance-parallel-size", type=int, default=1, metavar="G",
                   help="guidance groups: a step's guidance passes (cond / uncond / perturbed / isolated) run on G "
                   "groups of --tp-size x --sp-size ranks each (--num-gpus = G x TP x SP), and meet in one gather")
    p.add_argument("--enable-cfg-parallel", action="store_true", help="sglang's name: --guidance-parallel-size 2")


def _resolve_cfg_parallel(args) -> None:
    """--enable-cfg-parallel is --guidance-parallel-size 2 (sglang's flag; its cfg-parallel is 2 groups)."""
    if getattr(args, "enable_cfg_parallel", False):
        if args.guidance_parallel_size not in (1, 2):
            raise UsageError(f"--enable-cfg-parallel means --guidance-parallel-size 2, got --guidance-parallel-size "
                             f"{args.guidance_parallel_size}")
        args.guidance_parallel_size = 2


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="folder with the official LTX-2 files, or the checkpoint file")
    p.add_argument("--spatial-upsampler-path", default=None, help="default: *spatial-upscaler*.safetensors beside it")
    p.add_argument("--text-encoder-path", default=None, help="Gemma 3 folder (default: gemma* beside it); "
                   "'tiny' = the embedded stand-in")
    p.add_argument("--distilled-lora-path", default=None, help="stage-2 LoRA (default: *distilled-lora* beside it)")
    p.add_argument("--distilled-lora-strength", type=float, default=1.0)


def _add_guidance_args(p: argparse.ArgumentParser) -> None:
    """Stage-1 multimodal guidance, named as ltx-pipelines' arguments; unset: the model's defaults
    (pipelines/guidance.py; LTX-2: video cfg 3, stg 1 on block 29, rescale 0.7, a2v 3; audio cfg 7 ...)."""
    g = p.add_argument_group("guidance (ltx-pipelines' names; default: the model's)")
    g.add_argument("--guidance-scale", "--video-cfg-guidance-scale", dest="guidance_scale", type=float, default=3.0,
                   help="video CFG scale (sglang: --guidance-scale)")
    for name, kind, what in (("video-stg-guidance-scale", float, "video STG scale (0: off)"),
                             ("video-rescale-scale", float, "video rescale toward cond.std() (0: off)"),
                             ("a2v-guidance-scale", float, "video modality scale: audio->video (1: off)"),
                             ("video-skip-step", int, "guide video only on steps i %% (N+1) == 0"),
                             ("audio-cfg-guidance-scale", float, "audio CFG scale"),
                             ("audio-stg-guidance-scale", float, "audio STG scale (0: off)"),
                             ("audio-rescale-scale", float, "audio rescale (0: off)"),
                             ("v2a-guidance-scale", float, "audio modality scale: video->audio (1: off)"),
                             ("audio-skip-step", int, "guide audio only on steps i %% (N+1) == 0")):
        g.add_argument(f"--{name}", type=kind, default=None, help=what)
    g.add_argument("--video-stg-blocks", type=int, nargs="*", default=None, help="blocks whose video self-attention STG skips")
    g.add_argument("--audio-stg-blocks", type=int, nargs="*", default=None, help="blocks whose audio self-attention STG skips")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """The other pipelines' inputs, named as ltx-pipelines' arguments."""
    g = p.add_argument_group("pipeline inputs (ltx-pipelines' names)")
    g.add_argument("--image", dest="images", nargs="+", action="append", default=[], metavar="ARG",
                   help="PATH FRAME_IDX STRENGTH [CRF]: an image at a frame (repeat; keyframes: each one)")
    g.add_argument("--video-path", default=None, help="retake: the source video")
    g.add_argument("--start-time", type=float, default=None, help="retake: region start, seconds")
    g.add_argument("--end-time", type=float, default=None, help="retake: region end, seconds")
    g.add_argument("--lora", nargs="+", default=None, metavar=("PATH", "STRENGTH"), help="IC-LoRA: the LoRA file [strength]")
    g.add_argument("--video-conditioning", nargs=2, action="append", default=[], metavar=("PATH", "STRENGTH"),
                   help="IC-LoRA: a reference video (repeat)")
    g.add_argument("--conditioning-attention-strength", type=float, default=1.0, help="IC-LoRA: 0 to 1")
    g.add_argument("--audio-path", default=None, help="A2Vid: the audio to put video to")
    g.add_argument("--audio-start-time", type=float, default=0.0, help="A2Vid: seconds into the audio")
    g.add_argument("--audio-max-duration", type=float, default=None, help="A2Vid: seconds (default: the video's)")
    g.add_argument("--distilled-lora-strength-stage-1", type=float, default=None, help="HQ: default 0.25")
    g.add_argument("--distilled-lora-strength-stage-2", type=float, default=None, help="HQ: default 0.5")


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    from ltx2_tp.memory.swap import SOURCES

    m = p.add_argument_group("GPU memory cap (memory/planner.py; `ltx2-tp plan` prints the plan)")
    m.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="per GPU, e.g. 24GiB, 24GB, 24000MiB or bytes: the planner picks the resident blocks and "
                   "the activation plan, and on CUDA the cap is enforced (set_per_process_memory_fraction)")
    m.add_argument("--resident-blocks", default=None, metavar="K|auto",
                   help="the first K DiT blocks stay on the GPU, the others stream from --weight-source; auto (the "
                   "default with --max-gpu-memory): generate keeps as many as fit, serve streams every block")
    m.add_argument("--weight-source", default="host", choices=SOURCES,
                   help="streamed blocks live in pinned host memory, or are read from the checkpoint file at each use")


def _add_long_video_args(p: argparse.ArgumentParser) -> None:
    """LTX2LongVideo: one piece or temporal tiles (README 'Long videos (tiled)'); ComfyUI's looping sampler's units."""
    g = p.add_argument_group("long videos (LTX2LongVideo)")
    g.add_argument("--long-video-mode", default="auto", choices=["auto", "dense", "tiled"],
                   help="auto: dense within the model's trained 20 s when one piece fits, tiled otherwise")
    g.add_argument("--tile-frames", type=int, default=80,
                   help="tile length, a multiple of 8 (ComfyUI's temporal_tile_size: 80 = 10 latent frames = 73 frames)")
    g.add_argument("--tile-overlap-frames", type=int, default=24,
                   help="frames shared by consecutive tiles, a multiple of 8 (24 = 3 latent frames: 17 frames "
                   "cross-faded); each tile adds tile - overlap frames")
    g.add_argument("--tile-cond-strength", type=float, default=0.5,
                   help="how strongly a tile keeps the previous tile's overlap latents, video and audio (1: as they are)")
    g.add_argument("--adain-factor", type=float, default=0.0,
                   help="pull each tile's latent statistics toward the first tile's (0-1; 0.1-0.3 against drift "
                   "over minutes of one scene)")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-torch-compile", action="store_true",
                   help="torch.compile each DiT block (first request per resolution compiles: minutes at full size)")
    p.add_argument("--compile-cache-dir", default=None,
                   help="with --enable-torch-compile: inductor's on-disk cache, so a restart loads the compiled "
                   "graphs instead of compiling (serve: default OUTPUT_DIR/compile_cache; generate: torch's "
                   "/tmp/torchinductor_USER)")
    p.add_argument("--fp8", action="store_true", help="= --quantization fp8-rowwise")
    _add_quantization_arg(p)
    _add_attention_arg(p)


def _add_quantization_arg(p: argparse.ArgumentParser) -> None:
    from ltx2_tp.models.ltx2.quantization import QUANTIZATIONS

    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="fp8 DiT block linears (ltx-pipelines' flag). An fp8 checkpoint (Lightricks' *-fp8, "
                        "per-tensor scaled) is recognised and loaded as stored without it. fp8-cast: fp8 storage, "
                        "bf16 compute (takes the distilled LoRA); fp8-scaled-mm: per-tensor scaled fp8 matmuls "
                        "(bf16 checkpoints: quantized on load with dynamic activation scales, not the official "
                        "static ones); fp8-rowwise: per-row weight / per-token activation scales. The fp8 matmuls "
                        "need a CUDA GPU with CC >= 8.9")


def _add_attention_arg(p: argparse.ArgumentParser) -> None:
    from ltx2_tp.layers.attention_backend import BACKENDS

    p.add_argument("--attention", default="auto", choices=BACKENDS,
                   help="attention kernel; fp8 / fp8_qk / int8_fp8 / int8_qk are opt-in 8-bit approximations "
                        "(GPU with CC >= 8.9 and triton; README, layers/fp8_attention.py)")


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    from ltx2_tp.media_stream import PRESETS

    p.add_argument("--decode-mode", default="fast", choices=["fast", "exact"],
                   help="fast: the video VAE streamed in exact pieces overlapped with the encoder, x264 ultrafast "
                   "(CRF 23: PSNR at or above medium's, ~2.3x the bytes), frame threads, RGB -> YUV on the GPU; "
                   "exact: ltx-pipelines' decode and encoder settings (x264 medium), bit-identical frames; "
                   "the --video-encoder-* flags below override either (README 'Decode and write')")
    p.add_argument("--video-encoder-preset", default=None, choices=PRESETS,
                   help="libx264 preset for MP4 (default: the --decode-mode's: ultrafast / medium)")
    p.add_argument("--video-encoder-crf", type=float, default=None, help="libx264 CRF 0-51 (default 23; lower = better)")
    p.add_argument("--video-encoder-frame-threads", action=argparse.BooleanOptionalAction, default=None,
                   help="x264 frame threads instead of slice threads (more throughput on many cores; "
                   "default: the --decode-mode's: on / off)")
    p.add_argument("--video-convert", default=None, choices=["cpu", "gpu"],
                   help="RGB -> YUV 4:2:0 by swscale on the CPU (exact) or on the GPU (within 1 level of it; "
                   "default: the --decode-mode's: gpu / cpu)")


def _encoder_options(args, base=None):
    """The --video-encoder-* / --video-convert flags over `base` (default: EncoderOptions(), x264's
    own settings, what ltx-pipelines writes)."""
    import dataclasses

    from ltx2_tp.media_stream import EXACT_OPTIONS

    given = {k: v for k, v in (("preset", args.video_encoder_preset), ("crf", args.video_encoder_crf),
                               ("frame_threads", args.video_encoder_frame_threads), ("convert", args.video_convert))
             if v is not None}
    try:
        return dataclasses.replace(base or EXACT_OPTIONS, **given)
    except ValueError as e:
        raise UsageError(f"--video-encoder-*: {e}") from None


def _decode_settings(args):
    """(stream the VAE?, EncoderOptions) from --decode-mode and the encoder flags over it."""
    from ltx2_tp.media_stream import EXACT_OPTIONS, FAST_OPTIONS

    fast = args.decode_mode == "fast"
    return fast, _encoder_options(args, FAST_OPTIONS if fast else EXACT_OPTIONS)


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
    g.add_argument("--pipeline-class-name", default="LTX2LongVideo",
                   help="LTX2LongVideo, LTX2TwoStagePipeline, LTX2TwoStageHQPipeline, LTX2Pipeline, LTX2DistilledPipeline, "
                   "LTX2KeyframeInterpolationPipeline, LTX2RetakePipeline, LTX2ICLoraPipeline, LTX2A2VidPipeline")
    g.add_argument("--prompt", action="append", default=None,
                   help="the prompt; repeat it for one prompt per temporal tile (LTX2LongVideo tiled; the last repeats)")
    g.add_argument("--prompt-file", default=None, help="one prompt per line (per tile), or 'SECONDS: prompt' lines "
                   "(a schedule by time)")
    g.add_argument("--prompt-schedule", default=None, help="prompts by time, 'SECONDS:prompt|SECONDS:prompt' "
                   "(e.g. '0:a fox in the snow|12.5:the fox runs'): a tile takes the prompt in force at its first new frame")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--image-path", default=None, help="first-frame image (image-to-video)")
    g.add_argument("--width", type=int, default=384)
    g.add_argument("--height", type=int, default=256)
    g.add_argument("--num-frames", type=int, default=49)
    g.add_argument("--fps", type=float, default=24.0)
    g.add_argument("--num-inference-steps", type=int, default=None,
                   help="default: the model's (ltx-pipelines: LTX-2 40, LTX-2.3 30, HQ 15; tiny 8)")
    g.add_argument("--seed", type=int, default=0)
    _add_guidance_args(g)
    _add_input_args(g)
    _add_long_video_args(g)
    _add_layout_args(g)
    _add_speed_args(g)
    _add_approximation_args(g)
    _add_memory_args(g)
    _add_encoder_args(g)
    g.add_argument("--output-path", default="outputs/ltx2_tp.mp4")
    g.add_argument("--output-format", default=None, choices=["mp4", "webm", "gif"], help="default: from --output-path")
    _add_device_args(g, cpu_dtype="fp32")
    g.set_defaults(func=cmd_generate)
    from ltx2_tp.pipelines.request import MAX_IMAGE_PIXELS, MAX_MEDIA_BYTES  # not serving's: generate needs no FastAPI

    sv = sub.add_parser("serve", help="OpenAI-compatible /v1/videos server", formatter_class=_HelpWithDefaults)
    sv.add_argument("--model", default="tiny")
    _add_checkpoint_args(sv)
    sv.add_argument("--served-model-name", default="ltx-2-tiny")
    sv.add_argument("--pipeline-class-name", default="LTX2LongVideo",
                    help="the default pipeline (what the served model name runs); a request may pick another by "
                    "`model` or extra_body `pipeline` (GET /v1/models lists them)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--output-dir", default="outputs/server")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route")
    sv.add_argument("--max-queue", type=int, default=8, help="queued jobs beyond the running one; more get 429")
    sv.add_argument("--ttl-s", type=int, default=3600, help="finished jobs and their files are deleted after this "
                    "many seconds (also across restarts)")
    sv.add_argument("--max-video-tokens", type=int, default=400_000, help="larger requests get 400 (memory plan; "
                    "a tiled long video: its tile's tokens)")
    sv.add_argument("--max-frames", type=int, default=2001, help="longer requests get 400 (raise it for tiled long "
                    "videos, whose memory does not grow with their length)")
    sv.add_argument("--max-upload-bytes", type=int, default=10 * 2**20, help="input_reference larger than this: 413")
    sv.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                    help="input_reference with more pixels: 400 (read from the header, before decoding)")
    sv.add_argument("--max-media-upload-bytes", type=int, default=MAX_MEDIA_BYTES,
                    help="a request's uploaded videos and audio (video_reference, audio_path, video_conditioning) "
                    "together larger than this: 413")
    sv.add_argument("--ic-lora", action="append", default=None, metavar="NAME=PATH",
                    help="an IC-LoRA file requests may name (field ic_lora, with ic_lora_strength) for "
                    "LTX2ICLoraPipeline; repeat for several (weights are never uploaded)")
    sv.add_argument("--max-prompt-chars", type=int, default=10_000, help="longer prompts: 400")
    sv.add_argument("--collective-timeout-s", type=float, default=600,
                    help="several ranks: a DiT collective whose peer failed gives up after this long")
    sv.add_argument("--num-inference-steps", type=int, default=None,
                    help="default when a request gives none (default: each pipeline's for the model; tiny 8; "
                    "distilled: its fixed 8)")
    sv.add_argument("--warmup", default=None, metavar="WxHxF[,WxHxF...]",
                    help="run a 2-step dummy request per shape before taking requests (with "
                    "--enable-torch-compile: compiles them, or loads them from --compile-cache-dir); /health "
                    "answers 503 warming_up until done")
    _add_layout_args(sv)
    _add_speed_args(sv)
    _add_memory_args(sv)
    _add_encoder_args(sv)
    _add_device_args(sv, cpu_dtype="fp32")
    sv.set_defaults(func=cmd_serve)
    pl = sub.add_parser("plan", help="the memory plan of a request under --max-gpu-memory (nothing is allocated)",
                        formatter_class=_HelpWithDefaults)
    pl.add_argument("--model", default="ltx-2-19b", choices=sorted(PRESETS), help="the architecture (random weights)")
    pl.add_argument("--pipeline-class-name", default="LTX2LongVideo")
    pl.add_argument("--width", type=int, required=True)
    pl.add_argument("--height", type=int, required=True)
    pl.add_argument("--num-frames", type=int, required=True, help="8k+1")
    pl.add_argument("--fps", type=float, default=24.0)
    pl.add_argument("--num-gpus", type=int, default=1, help="the planner picks the layout (SP first, then TP)")
    pl.add_argument("--tp-size", type=int, default=None, help="fix the layout instead: TP x Ulysses x ring = --num-gpus")
    pl.add_argument("--ulysses-size", type=int, default=None)
    pl.add_argument("--ring-size", type=int, default=1)
    pl.add_argument("--max-gpu-memory", required=True, metavar="SIZE", help="per GPU: 24GiB, 24GB, 24000MiB or bytes")
    pl.add_argument("--quantization", default=None, choices=["fp8-cast", "fp8-scaled-mm", "fp8-rowwise"],
                    help="the blocks' storage (default: bf16)")
    pl.add_argument("--resident-blocks", default=None, metavar="K|auto", help="default: as many as fit")
    pl.add_argument("--layers", type=int, default=None, help="fewer blocks (to compare with a benchmark's --layers)")
    pl.set_defaults(func=cmd_plan)
    d = sub.add_parser("dit", help="one DiT forward with random weights: shapes and time", formatter_class=_HelpWithDefaults)
    d.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    d.add_argument("--num-frames", type=int, default=25, help="8k+1")
    d.add_argument("--height", type=int, default=256, help="a multiple of 32, the DiT's latent cell "
                   "(generate/serve need 64: the two-stage pipelines run stage 1 at half size)")
    d.add_argument("--width", type=int, default=384, help="a multiple of 32, as --height")
    d.add_argument("--fps", type=float, default=24.0)
    d.add_argument("--tp-size", type=int, default=1)
    d.add_argument("--sp-size", type=int, default=1)
    d.add_argument("--ulysses-size", type=int, default=None, help="default: --sp-size (all Ulysses)")
    d.add_argument("--ring-size", type=int, default=1)
    d.add_argument("--ffn-chunk-tokens", type=int, default=None)
    d.add_argument("--attn-chunk-tokens", type=int, default=None)
    _add_quantization_arg(d)
    _add_attention_arg(d)
    _add_approximation_args(d, pipeline=False)
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
        _resolve_cfg_parallel(args)
        _check_device(args)
        if getattr(args, "attention", "auto") != "auto":  # refuses (naming the flag) before anything is built
            from ltx2_tp.layers.attention_backend import QUANTIZED, set_attention_backend

            if args.attention in QUANTIZED and torch.cuda.is_available() and not str(args.device).startswith("cuda"):
                raise UsageError(f"--attention {args.attention}: runs on a CUDA device, got --device {args.device}")
            set_attention_backend(args.attention)
        return args.func(args)
    except ValueError as e:  # UsageError, config validation, layout errors
        print(f"ltx2-tp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
