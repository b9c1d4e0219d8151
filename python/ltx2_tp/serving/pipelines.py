"""The pipelines one server runs: every registered pipeline the server can feed, over ONE
LTX2Components (the weights are shared: no second copy; the distilled LoRA is fused only inside the
stage that needs it, as in each pipeline). A request picks one by `model` (a class name or its
alias, registry.ALIASES; the served model name is the default pipeline) or extra_body `pipeline`.

Pipelines are built on first use by the worker thread (every rank builds them in the same job
order: construction has no collective) and cached by class. A pipeline may set state on the shared
transformer when it is built (LTX2LongVideo: its PlanRule); each one is built from the server's
base state and its own state is put back before each of its jobs, so a job runs exactly as
`ltx2-tp generate --pipeline-class-name X` runs it. LTX2ICLoraPipeline gets the IC-LoRA its job
names (serving/ic_loras.py) before each job, as `generate --lora` gives it at construction.
"""

from __future__ import annotations

import threading

from ltx2_tp.pipelines.registry import get_pipeline_class, pipeline_aliases, pipeline_names, resolve_pipeline_name
from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.serving.errors import ApiError
from ltx2_tp.serving.ic_loras import ICLoras, takes_lora
from ltx2_tp.serving.uploads import BY_TARGET

# the request inputs POST /v1/videos can fill (serving/uploads.py): input_reference is an image at
# frame 0 (image_path), which is also what the keyframe pipeline needs at least of its `images`
SERVER_INPUTS = ("images", *BY_TARGET)


def unservable(cls) -> str | None:
    """Why the server cannot run this pipeline (None: it can): a registered pipeline needing an
    input no upload field fills."""
    missing = [f for f in cls.inputs if f not in SERVER_INPUTS]
    if not missing:
        return None
    return (f"{cls.name} needs {', '.join(missing)}, which this server does not take; run it with "
            f"`ltx2-tp generate --pipeline-class-name {cls.name}`")


class ServedPipelines:
    def __init__(self, components, default: str = "LTX2LongVideo", model_name: str = "ltx-2-tiny",
                 steps: int | None = None, encoder_options=None, stream_decode: bool | None = None,
                 fixed_plan_rule: bool = False, ic_loras: ICLoras | None = None):
        """`steps`: the default num_inference_steps for every guided pipeline (serve
        --num-inference-steps); None: each pipeline's own for the model (ltx-pipelines' PipelineParams).
        `ic_loras`: the IC-LoRA files requests may name (serve --ic-lora)."""
        self.c, self.model_name, self.steps, self.encoder_options = components, model_name, steps, encoder_options
        self.ic_loras = ic_loras if ic_loras is not None else ICLoras()
        self.stream_decode = stream_decode  # --decode-mode (None: the pipeline's default)
        self.fixed_plan_rule = fixed_plan_rule  # serve --max-gpu-memory: the planner's rule for every pipeline
        name = resolve_pipeline_name(default)
        if name is None:
            raise ValueError(f"unknown pipeline {default!r}; allowed: {', '.join(pipeline_names())}")
        why = unservable(get_pipeline_class(name))
        if why:
            raise ValueError(why)
        self.default = name
        self._base_rule = components.transformer.plan_rule
        self._built: dict[str, tuple] = {}  # name -> (pipeline, the transformer's plan rule it set)
        self._lock = threading.Lock()

    # ---- what a request may name ---------------------------------------------------------------
    def names(self) -> list[str]:
        """The pipelines this server runs, the default first."""
        return [self.default] + [n for n in pipeline_names() if n != self.default
                                 and unservable(get_pipeline_class(n)) is None]

    def models(self) -> list[dict]:
        """GET /v1/models: the served model name (the default pipeline), then each pipeline by class name."""
        out = [{"id": self.model_name, "pipeline": self.default, "aliases": []}]
        return out + [{"id": n, "pipeline": n, "aliases": pipeline_aliases(n)} for n in self.names()]

    def resolve(self, model: str | None, pipeline: str | None) -> str:
        """The class name a request runs with: `model` (a class name, an alias, or the served model
        name = the default) and extra_body `pipeline` (a class name or an alias); if both name a
        pipeline, the same one. ApiError 400 naming the field otherwise."""
        by_model = None
        if model and model != self.model_name:
            by_model = self._named(model, "model")
        by_field = self._named(pipeline, "pipeline") if pipeline else None
        if by_model and by_field and by_model != by_field:
            raise ApiError(400, f"model {model!r} ({by_model}) and pipeline {pipeline!r} ({by_field}) name different "
                                f"pipelines; give one of them, or the same in both", "pipeline", "conflicting_fields")
        return by_field or by_model or self.default

    def _named(self, value: str, field: str) -> str:
        name = resolve_pipeline_name(value)
        if name is None:
            ids = [self.model_name] if field == "model" else []
            raise ApiError(400, f"unknown {field} {value!r}; this server serves {', '.join(ids + self.names())} "
                                f"(or their aliases: GET /v1/models)", field, "model_not_found")
        why = unservable(get_pipeline_class(name))
        if why:
            raise ApiError(400, why, field, "unsupported_pipeline")
        return name

    def pipeline_class(self, name: str | None) -> type:
        return get_pipeline_class(name or self.default)

    def default_steps(self, name: str | None) -> int:
        cls = self.pipeline_class(name)
        if cls.fixed_steps is not None:
            return cls.fixed_steps
        if self.steps is not None:
            return self.steps
        return cls.default_params(self.c.transformer.cfg, self.c.checkpoint_path, self.c.name == "tiny").num_inference_steps

    def check(self, req: GenerationRequest) -> None:
        """The pipeline's own checks (size multiple, inputs, guidance blocks, the upsampler's smallest
        input): a RequestError naming the field."""
        from ltx2_tp.pipelines import approximations

        cls = self.pipeline_class(req.pipeline)
        if takes_lora(cls):  # the instance's own check with the request's LoRA (its downscale factor)
            name, _ = ICLoras.of(req)
            self.ic_loras.check(name)
            pipe = cls(self.c)  # no file is read: the factor is from the LoRA's metadata
            pipe.reference_downscale_factor = self.ic_loras.reference_downscale_factor(name)
            pipe.check(req)
            return
        cls.check_with(req, self.c)
        approximations.check_layout(req, self.c.ctx.ring_size)

    def choose_mode(self, req: GenerationRequest):
        """LTX2LongVideo's dense / tiled choice for the job log (AttributeError for other pipelines)."""
        return self.pipeline(req.pipeline).choose_mode(req)

    # ---- running ----------------------------------------------------------------------------
    def pipeline(self, name: str | None):
        """The pipeline instance (built on first use) with its state on the shared transformer."""
        name = name or self.default
        t = self.c.transformer
        with self._lock:
            if name not in self._built:
                shared, t.plan_rule = t.plan_rule, self._base_rule
                try:
                    pipe = get_pipeline_class(name)(self.c)
                    if self.encoder_options is not None:
                        pipe.encoder_options = self.encoder_options
                    if self.stream_decode is not None:
                        pipe.stream_decode = self.stream_decode
                    self._built[name] = (pipe, self._base_rule if self.fixed_plan_rule else t.plan_rule)
                finally:
                    t.plan_rule = shared
            pipe, rule = self._built[name]
            t.plan_rule = rule
        return pipe

    def __call__(self, req: GenerationRequest, output_path, progress=None, timer=None):
        if req.pipeline is None:  # a job stored before requests named their pipeline
            req.pipeline = self.default
        pipe = self.pipeline(req.pipeline)
        if takes_lora(type(pipe)):
            self.ic_loras.bind(pipe, req)
        return pipe(req, output_path, progress=progress, timer=timer)


class SinglePipeline:
    """A server around one pipeline object it was given (tests wrap one): only the served model
    name, the generic request checks, and the server's default steps."""

    def __init__(self, model_name: str, steps: int, spatial_multiple: int = 64):
        self.model_name, self.steps, self.spatial_multiple = model_name, steps, spatial_multiple
        self.ic_loras = ICLoras()

    def models(self) -> list[dict]:
        return [{"id": self.model_name, "pipeline": None, "aliases": []}]

    def resolve(self, model: str | None, pipeline: str | None) -> str | None:
        if model and model != self.model_name:
            raise ApiError(400, f"unknown model {model!r}; this server serves {self.model_name!r}", "model",
                           "model_not_found")
        if pipeline:
            raise ApiError(400, f"this server runs one pipeline; pipeline {pipeline!r} cannot be chosen", "pipeline",
                           "model_not_found")
        return None

    def pipeline_class(self, name):
        from ltx2_tp.pipelines.base import LTX2PipelineBase

        if self.spatial_multiple == LTX2PipelineBase.spatial_multiple:
            return LTX2PipelineBase
        return type("ServedPipeline", (LTX2PipelineBase,), {"spatial_multiple": self.spatial_multiple})

    def default_steps(self, name) -> int:
        return self.steps

    def check(self, req: GenerationRequest) -> None:
        req.validate(spatial_multiple=self.spatial_multiple)

