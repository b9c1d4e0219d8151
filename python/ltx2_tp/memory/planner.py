"""The request planner: a request's layout, resident blocks and activation plan under a GPU memory cap.

`plan_request` decides, before anything is allocated, per phase of a pipeline (text encoding;
stage 1 at half resolution and stage 2 at full, or one stage; VAE decode) what one rank runs
with, and predicts its peak. Nothing here is a second formula: block weights are
weights_estimate.py's (the meta-device blocks swap lays out), the device share of the blocks is
swap.py's blocks_device_nbytes, activations are estimate.py's through plan.py's plan_within.

Predicted peak per rank = (resident blocks + swap slots + non-block weights + the pipeline's other
models (COMPANION_BYTES) + fp8-cast's upcast weight + the activation peak) x (1 + FRAGMENTATION). The CUDA context (~0.5 GiB, outside torch's
allocator, not limited by set_per_process_memory_fraction) is not counted.

Rules, in order:
- layout: sequence parallel first (Ulysses, the ring for what the heads do not divide: the CLI's
  default), TP only when that does not fit (TP shards the weights, SP replicates them);
- activations next: the fastest activation plan (plan_within) that fits with every block streamed
  (a streamed 19B block's copy hides under 1080p compute; a smaller attention chunk or offloaded
  K/V costs time), for every DiT stage;
- then as many resident blocks as fit beside the largest stage's activations. The model carries
  one PlanRule(activation_budget_bytes = what is left), so each forward picks the same plans.
The transformer is built once for all stages, so one resident count serves both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ltx2_tp.latent_grid import LatentGrid, tokens_per_rank
from ltx2_tp.memory.estimate import StepShape, activation_bytes
from ltx2_tp.memory.plan import ExecutionPlan, PlanRule, plan_within
from ltx2_tp.memory.swap import blocks_device_nbytes
from ltx2_tp.memory.weights_estimate import STORAGES, model_block_bytes, non_block_weight_bytes

GIB = 2**30
FRAGMENTATION = 0.05  # the caching allocator's rounding and fragmentation, and kernel workspaces
SLOTS = 2  # swap buffers (double-buffered: one block computes while the next is copied)
TEXT_TOKENS = 1024  # prompt tokens the DiT attends to (an upper bound: text terms are small)
# Per rank: above this many video tokens a guidance pass is GEMM-bound, and batching the passes of
# a step only multiplies the activation memory (pipelines/guidance.py batch_guidance_passes).
CFG_BATCH_MAX_TOKENS = 16384
GUIDANCE_PASSES = 4  # cond, uncond, STG, modality isolation: the most a guided step batches
GEMMA3_12B_BYTES = 24_400_000_000  # the text encoder of ltx-2 / 2.3 in bf16 (12.2B parameters)
# The pipeline's other models, on the device for the whole request beside the DiT, bf16: video VAE
# decoder 528.4M + x2 upsampler 126.3M + audio VAE decoder 31.9M + vocoder 55.6M parameters (the
# real LTX-2 sizes: benchmark/bench_request.py's configs). The video encoder (image conditioning)
# is not counted: the benchmarks build it empty.
COMPANION_BYTES = 2 * (528_380_720 + 126_250_624 + 31_915_138 + 55_592_802)


class PlanError(ValueError):
    """Nothing fits; `change` is the smallest change that would (one line), `largest_frames` the
    most frames that fit at this size (None: not even one latent frame), `plan` the plan that was
    over (its `peak`: what the request needs as asked, with the smallest activation plans)."""

    def __init__(self, message: str, change: str = "", largest_frames: int | None = None,
                 plan: "RequestPlan | None" = None):
        super().__init__(message)
        self.change, self.largest_frames, self.plan = change, largest_frames, plan


def parse_bytes(text: str | int, flag: str = "--max-gpu-memory") -> int:
    """'24GiB', '24GB', '24000MiB', '1.5T', or plain bytes -> bytes (errors name `flag`)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"{flag}: expected a size such as 24GiB, 24GB, 24000MiB or bytes, got {text!r}")
        num, unit, binary = m.groups()
        base = 1024 if binary or not unit else 1000
        value = int(float(num) * base ** "_KMGT".index(unit.upper() or "_"))
    if value <= 0:
        raise ValueError(f"{flag}: must be a positive size, got {text!r}")
    return value


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB: the tiny model's plans)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def guidance_batched(local_video_tokens: int) -> bool:
    """The one rule for running a step's guidance passes as one forward (per-rank tokens)."""
    return local_video_tokens <= CFG_BATCH_MAX_TOKENS


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.ulysses * self.ring

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def describe(self) -> str:
        return f"TP={self.tp} Ulysses={self.ulysses} ring={self.ring}"


def layouts(cfg, num_gpus: int) -> list[Layout]:
    """Layouts of `num_gpus` in the planner's order: the least TP first; SP as Ulysses as far as the
    heads divide, the ring for the rest."""
    out = []
    for tp in [d for d in range(1, num_gpus + 1) if num_gpus % d == 0]:
        sp = num_gpus // tp
        for u in [d for d in range(sp, 0, -1) if sp % d == 0]:
            try:
                cfg.validate_parallel(tp, u)
            except ValueError:
                continue
            out.append(Layout(tp, u, sp // u))
            break
    if not out:
        raise ValueError(f"--num-gpus {num_gpus}: no TP x Ulysses x ring layout divides the model's heads")
    return out


@dataclass
class Phase:
    """One phase of a request on one rank."""

    name: str
    width: int = 0
    height: int = 0
    frames: int = 0
    tokens_per_rank: int = 0
    audio_tokens: int = 0
    batch: int = 1
    plan: ExecutionPlan | None = None
    weights: int = 0  # block weights on the device (resident + slots) + non-block + transients
    activations: int = 0
    other: int = 0  # another model's weights (the text encoder)
    peak: int = 0
    fits: bool = True
    note: str = ""

    def offload(self) -> str:
        if self.plan is None:
            return "-"
        tiers = [t for t, on in (("kv", self.plan.kv_offload), ("residual", self.plan.residual_offload)) if on]
        return "+".join(tiers) or "none"


@dataclass
class RequestPlan:
    cap: int
    storage: str
    layout: Layout
    num_layers: int
    resident_blocks: int
    activation_budget: int  # the PlanRule's: what remains after weights, before the margin
    phases: list[Phase] = field(default_factory=list)
    required: int = 0  # the smallest cap this request needs on these GPUs (any layout, every block streamed)
    text_encoder_on_host: bool = False  # the encoder does not fit beside the DiT: build it on the CPU
    header: str = ""

    @property
    def streamed_blocks(self) -> int:
        return self.num_layers - self.resident_blocks

    @property
    def dit_phases(self) -> list[Phase]:
        return [p for p in self.phases if p.plan is not None]

    @property
    def peak(self) -> int:
        """The predicted peak per rank over the DiT stages (what the cap enforces)."""
        return max(p.peak for p in self.dit_phases)

    def plan_rule(self) -> PlanRule:
        return PlanRule(activation_budget_bytes=self.activation_budget)

    def table(self) -> str:
        rows = [self.header] if self.header else []
        rows.append(f"layout {self.layout.describe()} ({self.layout.num_gpus} GPU); DiT blocks: {self.resident_blocks} "
                    f"resident, {self.streamed_blocks} streamed ({SLOTS} slots); PlanRule activation budget "
                    f"{gib(self.activation_budget)}; peak = weights + activations + other, +{FRAGMENTATION:.0%} "
                    "fragmentation (CUDA context not counted)")
        rows.append(f"{'phase':<13}{'size':>16}{'tok/rank':>10}{'batch':>6}{'attn_chunk':>11}{'ffn_chunk':>10}"
                    f"{'rope':>6}{'offload':>10}{'weights':>10}{'activ.':>9}{'other':>9}{'peak/rank':>11}")
        for p in self.phases:
            size = f"{p.width}x{p.height}x{p.frames}" if p.width else "-"
            pl = p.plan
            attn = "-" if pl is None else str(pl.attn_chunk_tokens or "whole")
            ffn = "-" if pl is None else str(pl.ffn_chunk_tokens or "whole")
            rope = "-" if pl is None else ("cache" if pl.cache_rope else "chunk")
            g = (lambda n: f"{n / GIB:.2f}G")
            rows.append(f"{p.name:<13}{size:>16}{p.tokens_per_rank or '-':>10}{p.batch:>6}{attn:>11}{ffn:>10}"
                        f"{rope:>6}{p.offload():>10}{g(p.weights):>10}{g(p.activations):>9}{g(p.other):>9}"
                        f"{(g(p.peak) if p.peak else '-'):>11}{'' if p.fits else '  OVER'}")
            if p.note:
                rows.append(f"  {p.name}: {p.note}")
        rows.append(f"predicted DiT peak per rank {gib(self.peak)} of {gib(self.cap)}")
        return "\n".join(rows)


def _with_margin(n: float) -> int:
    return math.ceil(n * (1 + FRAGMENTATION))


def _transient(cfg, storage: str, tp: int) -> int:
    """fp8-cast upcasts one weight while its linear runs: the largest, an FFN weight, in bf16."""
    return cfg.inner_dim * cfg.inner_dim * cfg.ff_mult // tp * 2 if storage == "fp8-cast" else 0


def _stage_shapes(cfg, width, height, num_frames, fps, two_stage, guided, layout, dtype_bytes, text_tokens,
                  per_token_timesteps):
    """(name, grid, StepShape) per DiT stage: stage 1 at half resolution (guided), stage 2 at full
    (the distilled LoRA, one pass); a one-stage pipeline runs one guided stage at full size."""
    stages = [("stage1", 2, guided), ("stage2", 1, False)] if two_stage else [("stage", 1, guided)]
    out = []
    for name, divide, g in stages:
        grid = LatentGrid(num_frames, height // divide, width // divide)
        local = tokens_per_rank(grid.video_tokens, layout.sp)
        batch = GUIDANCE_PASSES if g and guidance_batched(local) else 1
        shape = StepShape(local, grid.audio_tokens(fps) if cfg.has_audio else 0, text_tokens, batch, layout.tp,
                          layout.ulysses, layout.ring, per_token_timesteps, dtype_bytes)
        out.append((name, grid, shape))
    return out


def _stage_plan(cfg, shape: StepShape, budget: float, rule: PlanRule | None):
    """(plan, activation bytes, fits) of one DiT stage: the fastest plan within `budget`
    (plan_within), or, given the rule a built model runs with, the plan that rule picks (a model
    with no plan applied chunks by LTX2LongVideo's fixed budget, whatever memory is left)."""
    if rule is None:
        return plan_within(cfg, shape, budget)
    plan = rule.for_step(cfg, shape)
    act = activation_bytes(cfg, plan, shape)
    return plan, act, act <= budget


def _fit(cfg, cap, storage, layout, shapes, resident_blocks, dtype_bytes, companion_bytes=0, rule=None):
    """(RequestPlan-ish fields, fits) for one layout: see the module docstring's rules."""
    sizes = model_block_bytes(cfg, storage, layout.tp)
    fixed = (non_block_weight_bytes(cfg, layout.tp, dtype_bytes) + _transient(cfg, storage, layout.tp)
             + companion_bytes)
    usable = cap / (1 + FRAGMENTATION)
    streamed_all = blocks_device_nbytes(sizes, 0, SLOTS)
    budget0 = usable - fixed - streamed_all
    acts, fits = [], True
    for _, _, shape in shapes:
        plan, act, ok = _stage_plan(cfg, shape, budget0, rule)
        acts.append(act)
        fits &= ok
    least = max(plan_within(cfg, shape, 0)[1] for _, _, shape in shapes)  # the smallest plan of each stage
    required = _with_margin(fixed + streamed_all + least)
    if resident_blocks is None:  # as many as fit beside the largest stage's activations
        room = usable - fixed - max(acts)
        ok_k = [k for k in range(len(sizes) + 1) if blocks_device_nbytes(sizes, k, SLOTS) <= room]
        resident_blocks = max(ok_k) if ok_k else 0
    block_dev = blocks_device_nbytes(sizes, resident_blocks, SLOTS)
    budget = int(usable - fixed - block_dev)
    plans = [_stage_plan(cfg, shape, budget, rule) for _, _, shape in shapes]
    fits = fits and all(ok for _, _, ok in plans)
    return dict(resident_blocks=resident_blocks, budget=budget, weights=fixed + block_dev, plans=plans,
                required=required, fits=fits)


def plan_request(cfg, *, width: int, height: int, num_frames: int, max_gpu_memory_bytes: int, fps: float = 24.0,
                 two_stage: bool = True, guided: bool = True, num_gpus: int = 1, storage: str = "bf16",
                 layout: Layout | None = None, resident_blocks: int | None = None, text_encoder_bytes: int = 0,
                 companion_bytes: int = 0,
                 dtype_bytes: int = 2, text_tokens: int = TEXT_TOKENS, per_token_timesteps: bool = True,
                 pipeline: str = "", model: str = "", explain: bool = True,
                 plan_rule: PlanRule | None = None) -> RequestPlan:
    """The plan of one request under `max_gpu_memory_bytes` per GPU (module docstring), or PlanError
    naming the smallest change that fits (fewer frames, fp8 storage, more GPUs, a larger cap).
    `plan_rule`: the rule a built model already runs with (its activation plans are then that
    rule's, not chosen here)."""
    if storage not in STORAGES:
        raise ValueError(f"--quantization: storage must be one of {STORAGES}, got {storage!r}")
    if resident_blocks is not None and not 0 <= resident_blocks <= cfg.num_layers:
        raise ValueError(f"--resident-blocks must be in [0, {cfg.num_layers}] (the model's blocks), got {resident_blocks}")
    cap = int(max_gpu_memory_bytes)
    candidates = [layout] if layout is not None else layouts(cfg, num_gpus)

    def attempt(encoder: int):  # every layout: the first that fits is used, the least required is reported
        tried = []
        for lay in candidates:
            shapes = _stage_shapes(cfg, width, height, num_frames, fps, two_stage, guided, lay, dtype_bytes,
                                   text_tokens, per_token_timesteps)
            fit = _fit(cfg, cap, storage, lay, shapes, resident_blocks, dtype_bytes, companion_bytes + encoder,
                       plan_rule)
            tried.append((lay, fit, shapes))
        return tried

    # The text encoder on the GPU stays there for the whole request (pipelines build it once): it
    # is one more fixed weight of every phase. When the request does not fit with it, it runs on
    # the host and only its outputs reach the GPU.
    encoder = text_encoder_bytes
    tried = attempt(encoder)
    if encoder and not any(t[1]["fits"] for t in tried):
        encoder, tried = 0, attempt(0)
    fitting = [t for t in tried if t[1]["fits"]]
    least = min(tried, key=lambda t: t[1]["required"])
    lay, f, shapes = fitting[0] if fitting else least
    rp = RequestPlan(cap, storage, lay, cfg.num_layers, f["resident_blocks"], f["budget"],
                     required=least[1]["required"])
    rp.header = (f"plan: {pipeline or ('two-stage' if two_stage else 'one-stage')} {width}x{height}x{num_frames} "
                 f"@{fps:g} fps, {model or 'model'} {storage}, {lay.num_gpus} GPU, cap {gib(cap)} per GPU")
    dit_weights = f["weights"] - encoder
    rp.text_encoder_on_host = bool(text_encoder_bytes) and not encoder
    if rp.text_encoder_on_host:
        rp.phases.append(Phase("text_encoder", weights=dit_weights, note=(
            f"on the host (CPU, bf16): the request does not fit with {gib(text_encoder_bytes)} of encoder weights "
            "on the GPU for the whole request; only its outputs reach the GPU (slower: minutes)")))
    else:
        rp.phases.append(Phase("text_encoder", other=encoder, weights=dit_weights,
                               peak=_with_margin(encoder + dit_weights) if encoder else 0, note="" if not encoder else
                               "on the GPU beside the DiT's device weights for the whole request (its activations "
                               "are not counted)"))
    for (name, grid, shape), (plan, act, ok) in zip(shapes, f["plans"]):
        rp.phases.append(Phase(name, grid.width, grid.height, grid.frames, shape.video_tokens, shape.audio_tokens,
                               shape.batch, plan, dit_weights, act, encoder, _with_margin(dit_weights + act + encoder),
                               ok))
    rp.phases.append(Phase("vae_decode", width, height, num_frames, weights=dit_weights, other=encoder,
                           note="pieces sized from what the process may still use at decode time (pipelines/decode.py)"))
    if f["fits"]:
        return rp
    if not explain:
        raise PlanError(f"{width}x{height}x{num_frames} does not fit {gib(cap)} per GPU", plan=rp)
    raise _refusal(cfg, cap, rp, dict(width=width, height=height, num_frames=num_frames, fps=fps, two_stage=two_stage,
                                      guided=guided, num_gpus=num_gpus, storage=storage, layout=layout,
                                      resident_blocks=resident_blocks, dtype_bytes=dtype_bytes,
                                      text_tokens=text_tokens, per_token_timesteps=per_token_timesteps,
                                      text_encoder_bytes=text_encoder_bytes, companion_bytes=companion_bytes,
                                      plan_rule=plan_rule))


def fits(cfg, **kw) -> bool:
    try:
        plan_request(cfg, explain=False, **kw)
        return True
    except PlanError:
        return False


def largest_frames(cfg, **kw) -> int | None:
    """The most frames (8k + 1, at most kw['num_frames']) that fit, by bisection; None if not even 1."""
    lo, hi = 0, (kw.pop("num_frames") - 1) // 8  # k: frames = 8k + 1
    if not fits(cfg, num_frames=1, **kw):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(cfg, num_frames=8 * mid + 1, **kw):
            lo = mid
        else:
            hi = mid - 1
    return 8 * lo + 1


def _refusal(cfg, cap, rp: RequestPlan, kw) -> PlanError:
    size = f"{kw['width']}x{kw['height']}"
    over = rp.required
    changes = []
    frames = largest_frames(cfg, max_gpu_memory_bytes=cap, **kw)
    if frames is not None:
        changes.append(f"--num-frames {frames} (the most that fit at {size})")
    if kw["storage"] == "bf16" and fits(cfg, max_gpu_memory_bytes=cap, **{**kw, "storage": "fp8-cast"}):
        changes.append("fp8 storage (--quantization fp8-cast)")
    if kw["layout"] is None:
        for n in (2, 4, 8):
            if n > kw["num_gpus"] and fits(cfg, max_gpu_memory_bytes=cap, **{**kw, "num_gpus": n}):
                changes.append(f"--num-gpus {n}")
                break
    unit, scale = ("GiB", GIB) if over >= GIB else ("MiB", 2**20)
    changes.append(f"--max-gpu-memory {math.ceil(over / scale * 100) / 100:g}{unit}")
    change = "; or ".join(changes)
    msg = (f"{size}x{kw['num_frames']} does not fit {gib(cap)} per GPU (needs {gib(over)} with every block "
           f"streamed, {rp.layout.describe()}); the smallest change: {change}")
    return PlanError(msg, change, frames, rp)
