"""sglang out-of-tree registration: `sglang generate --pipeline-class-name LTX2LongVideo` runs our pipeline.

Three ways in, all ending in `register()` (idempotent):
- the entry point `ltx2_tp = ltx2_tp.integrations.sglang:register` in the group
  `sglang.multimodal_gen.plugins` (pyproject.toml): installing ltx2_tp is enough for sglang's
  workers, which call `load_plugins()` at start-up;
- `SGLANG_EXTERNAL_MODEL_PACKAGE=ltx2_tp.integrations.sglang`: sglang imports this module while it
  initialises its registry, before `sglang generate` decides whether the model path is a diffusion
  model (importing it registers);
- calling `register()` yourself.

What is registered: our DiT in sglang's `ModelRegistry` as `LTX2TPModel`; every pipeline of our
registry as a native sglang pipeline of the same name: `LTX2LongVideo` (recognised for the model
paths `ltx2-tp/tiny`, the embedded tiny model, and `ltx2-tp/<dir>`-style names),
`LTX2DistilledPipeline`, `LTX2KeyframeInterpolationPipeline`, `LTX2RetakePipeline`,
`LTX2ICLoraPipeline`, `LTX2A2VidPipeline`; and, only when `LTX2_TP_SGLANG_TWO_STAGE=1`, ours in
place of sglang's own pipelines of the same names (`LTX2Pipeline`, `LTX2TwoStagePipeline`,
`LTX2TwoStageHQPipeline`).

The sglang pipeline is one stage that runs our pipeline end to end (text -> stage 1 -> upsample ->
stage 2 -> decode -> MP4 with audio) on the DiT built over sglang's TP / Ulysses / ring groups
(`parallel_context_from_sglang`), and hands sglang the written file.

The pipelines' inputs, by sglang's own names where it has them: the retake source is sglang's
`video_path` (its video API fills it from the multipart `video_reference` upload or a `video_path` /
`video_url` field); the IC-LoRA file is sglang's server argument `--lora-path` at `--lora-scale`.
The others are model-owned request fields (LTX2TPSamplingParams, accepted by sglang's video API and
by `sglang generate --config FILE`) named as ltx-pipelines' arguments: start_time / end_time
(retake), audio_path / audio_start_time / audio_max_duration (A2Vid), video_conditioning
([[path, strength], ...]) and conditioning_attention_strength (IC-LoRA).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ltx2_tp.pipelines.request import TILED_MAX_FRAMES, GenerationRequest
from ltx2_tp.serving.ranks import run_on_rank, this_rank

TINY_MODEL_PATH = "ltx2-tp/tiny"
MODEL_ARCH = "LTX2TPModel"
TWO_STAGE_ENV = "LTX2_TP_SGLANG_TWO_STAGE"
SGLANG_OWN = ("LTX2Pipeline", "LTX2TwoStagePipeline", "LTX2TwoStageHQPipeline")  # sglang ships pipelines by these names

_REGISTERED = False
_REQUEST_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}


def parallel_context_from_sglang():
    """Our ParallelContext over the groups sglang's worker created (TP, Ulysses, ring)."""
    from sglang.multimodal_gen.runtime.distributed import parallel_state as ps

    from ltx2_tp.distributed.context import SINGLE, from_groups

    if not ps.model_parallel_is_initialized():
        return SINGLE
    tp = ps.get_tp_group()
    sp = ps.get_sp_group()
    u, r = ps.get_ulysses_parallel_world_size(), ps.get_ring_parallel_world_size()
    return from_groups(tp_group=tp.device_group if tp.world_size > 1 else None,
                       ulysses_group=sp.ulysses_group if u > 1 else None,
                       ring_group=sp.ring_group if r > 1 else None,
                       sp_group=sp.device_group if sp.world_size > 1 else None)


try:  # the sglang-facing classes subclass sglang's: they exist only where sglang does
    from sglang.multimodal_gen.configs.pipeline_configs.base import ModelTaskType, PipelineConfig
    from sglang.multimodal_gen.configs.sample.sampling_params import SamplingParams
    from sglang.multimodal_gen.runtime.pipelines_core.composed_pipeline_base import ComposedPipelineBase
    from sglang.multimodal_gen.runtime.pipelines_core.schedule_batch import OutputBatch
    from sglang.multimodal_gen.runtime.pipelines_core.stages.base import PipelineStage
except ImportError:  # sglang not installed: nothing to register into
    HAVE_SGLANG = False
else:
    HAVE_SGLANG = True


if HAVE_SGLANG:

    @dataclasses.dataclass
    class LTX2TPPipelineConfig(PipelineConfig):
        task_type: ModelTaskType = ModelTaskType.TI2V
        skip_input_image_preprocess: bool = True

    @dataclasses.dataclass
    class LTX2TPSamplingParams(SamplingParams):
        # GenerationRequest's defaults (those of ltx-pipelines' two-stage example)
        height: int = _REQUEST_DEFAULTS["height"]
        width: int = _REQUEST_DEFAULTS["width"]
        num_frames: int = _REQUEST_DEFAULTS["num_frames"]
        fps: int = int(_REQUEST_DEFAULTS["fps"])
        num_inference_steps: int = _REQUEST_DEFAULTS["num_inference_steps"]
        guidance_scale: float = _REQUEST_DEFAULTS["guidance_scale"]
        negative_prompt: str = _REQUEST_DEFAULTS["negative_prompt"]
        seed: int = _REQUEST_DEFAULTS["seed"]
        # LTX2LongVideo's long-video fields (None: the request's default): from `sglang generate
        # --config FILE` (its keys that are fields here) or the video API's model-owned fields
        long_video_mode: str | None = None
        tile_frames: int | None = None
        tile_overlap_frames: int | None = None
        tile_cond_strength: float | None = None
        adain_factor: float | None = None
        prompts: list | None = None
        prompt_schedule: Any = None
        # the other pipelines' inputs (ltx-pipelines' names; None: the request's default). The retake
        # source is sglang's own `video_path`.
        start_time: float | None = None
        end_time: float | None = None
        audio_path: str | None = None
        audio_start_time: float | None = None
        audio_max_duration: float | None = None
        video_conditioning: list | None = None
        conditioning_attention_strength: float | None = None

        @classmethod
        def video_request_extra_fields(cls) -> frozenset[str]:
            return frozenset((*LONG_VIDEO_FIELDS, *INPUT_FIELDS))

    class LTX2TPGenerateStage(PipelineStage):
        """Runs one of our pipelines for the request and returns the written MP4 to sglang."""

        def __init__(self, pipeline, cap=None):
            super().__init__()
            self.pipeline, self.cap = pipeline, cap

        def forward(self, batch, server_args):
            req = request_from_sglang(batch, self.cap)
            result = run_on_rank(self.pipeline, req, output_path_from_sglang(batch), this_rank())
            out = OutputBatch(output=None, metrics=getattr(batch, "metrics", None))
            out.fps = int(round(req.fps))
            if result is not None:
                out.output_file_paths = [str(result.path)]
            return out

    class _LTX2TPPipeline(ComposedPipelineBase):
        _required_config_modules: list[str] = []

        def _load_config(self) -> dict[str, Any]:  # no diffusers model_index.json
            return {"_class_name": self.pipeline_name, "_diffusers_version": "none"}

        def load_modules(self, server_args, loaded_modules=None) -> dict[str, Any]:
            return {"ltx2_tp_components": build_components_for_sglang(self.model_path, server_args)}

        def create_pipeline_stages(self, server_args) -> None:
            from ltx2_tp.pipelines.registry import get_pipeline_class

            cls = get_pipeline_class(self.pipeline_name)  # ours under the same name
            comps = self.modules["ltx2_tp_components"]
            pipe = cls(comps, **pipeline_options(cls, server_args))
            self.add_stage(LTX2TPGenerateStage(pipe, sglang_cap(comps, cls)), "ltx2_tp_generate")

    def _sglang_class(name: str) -> type:
        """The sglang pipeline running our pipeline `name`, a module attribute (sglang's workers import it)."""
        cls_name = f"SGLang{name}"
        if cls_name not in globals():
            globals()[cls_name] = type(cls_name, (_LTX2TPPipeline,), {"pipeline_name": name, "__module__": __name__})
        return globals()[cls_name]

    SGLangLTX2LongVideo = _sglang_class("LTX2LongVideo")
    SGLangLTX2TwoStagePipeline = _sglang_class("LTX2TwoStagePipeline")


def is_ltx2_tp_model_path(path: str) -> bool:
    return str(path).lower().startswith("ltx2-tp/")


# sglang's server has no memory flags: these environment variables give the cap (memory/planner.py)
MAX_GPU_MEMORY_ENV = "LTX2_TP_MAX_GPU_MEMORY"  # e.g. 24GiB: auto tiles past it; requests over the plan are refused
RESIDENT_BLOCKS_ENV = "LTX2_TP_RESIDENT_BLOCKS"  # with the cap: K resident DiT blocks (default 0: all streamed)


def _resident_blocks() -> int | None:
    if not os.environ.get(MAX_GPU_MEMORY_ENV):
        return None
    return int(os.environ.get(RESIDENT_BLOCKS_ENV) or 0)


def sglang_cap(comps, pipeline_cls):
    """The cap LTX2_TP_MAX_GPU_MEMORY gives (None without it), applied to the built components as
    `serve --max-gpu-memory` applies its own (planning.apply_plan: the cap recorded, the activation
    budget as the model's PlanRule; the budget depends on the weights only), after the pipeline
    (built first) set its own rule. Returns the CapCheck requests are planned under: the components
    as built (planning.CapCheck.built: layout, block storage, resident blocks, dtype, PlanRule), the
    same inputs the pipeline's auto mode then plans with."""
    text = os.environ.get(MAX_GPU_MEMORY_ENV)
    if not text:
        return None
    from ltx2_tp.memory.planner import parse_bytes
    from ltx2_tp.pipelines.planning import CapCheck, apply_plan

    cap = parse_bytes(text, MAX_GPU_MEMORY_ENV)
    apply_plan(CapCheck.built(comps, pipeline_cls, cap).plan(64, 64, 1, 24.0), comps)
    return CapCheck.built(comps, pipeline_cls)


def pipeline_options(cls, server_args) -> dict:
    """Constructor options from sglang's server arguments: the IC-LoRA is `--lora-path` at
    `--lora-scale` (as `ltx2-tp generate --lora PATH STRENGTH`)."""
    from ltx2_tp.serving.ic_loras import takes_lora

    lora = getattr(server_args, "lora_path", None)
    if not lora or not takes_lora(cls):
        return {}
    return {"lora_path": lora, "lora_strength": float(getattr(server_args, "lora_scale", 1.0))}


def request_from_sglang(batch, cap=None) -> GenerationRequest:
    """sglang's Req (its SamplingParams fields) -> our GenerationRequest, validated (names the field);
    with a cap (`sglang_cap`), planned as generate plans it (planning.request_plan: LTX2LongVideo's
    auto tiles what does not fit in one piece, and then one tile must fit); a request over the plan
    is refused naming num_frames (tile_frames for a tile) and the largest value that fits."""

    def first(v):
        return v[0] if isinstance(v, (list, tuple)) else v

    req = GenerationRequest(
        prompt=first(batch.prompt) or "",
        negative_prompt=first(getattr(batch, "negative_prompt", "")) or "",
        width=int(batch.width), height=int(batch.height), num_frames=int(batch.num_frames),
        fps=float(batch.fps), num_inference_steps=int(batch.num_inference_steps),
        guidance_scale=float(batch.guidance_scale), seed=int(first(batch.seed)),
        image_path=first(getattr(batch, "image_path", None)),
        video_path=first(getattr(batch, "video_path", None)),  # sglang's field: the retake source
        **{f: getattr(batch, f) for f in SGLANG_EXTRA_FIELDS if getattr(batch, f, None) is not None},
    )
    # IC-LoRA's references as JSON gives them: [[path, strength], ...] (or one path: strength 1)
    refs = req.video_conditioning
    if isinstance(refs, str):
        refs = [refs]
    req.video_conditioning = [(r, 1.0) if isinstance(r, str) else tuple(r) for r in refs]
    # the pipeline checks its own size rule and frame limit (a tiled long video takes more) when it runs
    req.validate(max_frames=TILED_MAX_FRAMES, spatial_multiple=32)
    if cap is not None:
        from ltx2_tp.pipelines.planning import request_plan

        cap.pipeline_cls.check_request(req, cap.cfg.num_layers)  # a retake takes its source's size and frames
        request_plan(cap, req, "num_frames")
    return req


LONG_VIDEO_FIELDS = ("long_video_mode", "tile_frames", "tile_overlap_frames", "tile_cond_strength", "adain_factor",
                     "prompts", "prompt_schedule")
# Retake's region, A2Vid's audio, IC-LoRA's references (the retake source is sglang's video_path)
INPUT_FIELDS = ("start_time", "end_time", "audio_path", "audio_start_time", "audio_max_duration", "video_conditioning",
                "conditioning_attention_strength")
# our request fields sglang passes through when its request carries them (ltx-pipelines' names)
SGLANG_EXTRA_FIELDS = ("video_stg_guidance_scale", "video_rescale_scale", "video_stg_blocks", "a2v_guidance_scale",
                       "video_skip_step", "audio_cfg_guidance_scale", "audio_stg_guidance_scale", "audio_rescale_scale",
                       "audio_stg_blocks", "v2a_guidance_scale", "audio_skip_step", *INPUT_FIELDS, *LONG_VIDEO_FIELDS)


def output_path_from_sglang(batch) -> str:
    out_dir = getattr(batch, "output_path", None) or "outputs"
    name = getattr(batch, "output_file_name", None) or f"{getattr(batch, 'request_id', None) or 'ltx2_tp'}"
    if not os.path.splitext(name)[1]:
        name += ".mp4"
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, name)


def build_components_for_sglang(model_path: str, server_args):
    """Components for sglang's worker: our DiT on sglang's groups, ltx-core's VAE & co."""
    from ltx2_tp.pipelines.checkpoints import build_components

    ctx = parallel_context_from_sglang()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = "tiny" if str(model_path).rstrip("/").lower() == TINY_MODEL_PATH else model_path
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    comps = build_components(model, device=device, dtype=dtype, ctx=ctx, resident_blocks=_resident_blocks())
    if getattr(server_args, "enable_torch_compile", False):  # sglang's --enable-torch-compile
        from ltx2_tp.compile import compile_blocks

        compile_blocks(comps.transformer)
    return comps


def register() -> None:
    """Register with sglang's model and pipeline registries (safe to call more than once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    if not HAVE_SGLANG:
        raise ImportError("sglang is not installed (pip install sglang; see README 'sglang')")
    from sglang.multimodal_gen.registry import register_pipeline
    from sglang.multimodal_gen.runtime.models.registry import ModelRegistry

    from ltx2_tp.pipelines.registry import pipeline_names

    _REGISTERED = True  # set first: register_pipeline re-enters the registry, which imports us again
    ModelRegistry.register_model(MODEL_ARCH, "ltx2_tp.models.ltx2.model:LTX2Model")
    register_pipeline(SGLangLTX2LongVideo, sampling_param_cls=LTX2TPSamplingParams,
                      pipeline_config_cls=LTX2TPPipelineConfig, hf_model_paths=[TINY_MODEL_PATH],
                      model_detectors=[is_ltx2_tp_model_path], overwrite=True)
    for name in pipeline_names():
        if name == "LTX2LongVideo" or (name in SGLANG_OWN and os.environ.get(TWO_STAGE_ENV) != "1"):
            continue
        register_pipeline(_sglang_class(name), sampling_param_cls=LTX2TPSamplingParams,
                          pipeline_config_cls=LTX2TPPipelineConfig, overwrite=True)


# SGLANG_EXTERNAL_MODEL_PACKAGE imports this module: importing registers.
if HAVE_SGLANG:
    register()
