"""Stage-1 multimodal guidance, as ltx-pipelines 1.0.0 runs it, on our DiT.

ltx-core's `MultiModalGuider` combines up to four DiT passes of a step per modality:

    pred = cond + (cfg - 1)(cond - uncond_text) + stg (cond - perturbed) + (modality - 1)(cond - isolated)
    then, with rescale r: pred *= r * cond.std() / pred.std() + (1 - r)

- uncond_text: the negative prompt (run when either modality's cfg != 1);
- perturbed (STG): video / audio self-attention skipped on the guider's `stg_blocks` (stg != 0);
- isolated: both a<->v cross-attentions skipped on every block (modality scale != 1);
- `skip_step` N: only steps i with i % (N + 1) == 0 are guided, the others reuse the last result;
- a `MultiModalGuiderFactory` bins the params by sigma (`build_from_sigma`).

`guided_denoise_fn` is ltx-pipelines' `multi_modal_guider_factory_denoising_func` with one change in
how, not what, it computes: the passes of a step run as ONE batched forward when
`batch_guidance_passes` says they fit (each batch element carries its own perturbation: our DiT's
`Perturbations`), else one forward each, as ltx-pipelines does. Both give the same result
(test/test_official_pipelines.py: fp32, relative max error <= 1e-5).

Guidance-parallel (`--guidance-parallel-size G`, distributed/context.py's outermost dimension):
each of G rank groups runs a share of the step's passes (`split_passes`: round-robin, batched
within the group as above), one all-gather brings every pass to every rank
(collectives.gather_guidance_passes), and every rank combines them identically, so all hold the
same next latent. Steps where both guiders skip run no pass and no collective on any rank; a
group with no pass that step (fewer passes than groups) joins the gather with zeros. Unguided
denoising (stage 2, distilled) runs whole in every group. Equal to one process:
test/test_guidance_parallel.py.

The defaults per model version are ltx-pipelines' own `PipelineParams` (utils/constants.py), picked
the way its entry points pick them: `detect_params(checkpoint)` reads the checkpoint's
`model_version` (2.3* -> LTX_2_3_PARAMS: 30 steps, STG block 28; else LTX_2_PARAMS: 40 steps, STG
block 29; both: video cfg 3, stg 1, rescale 0.7, modality 3; audio cfg 7, stg 1, rescale 0.7,
modality 3). The HQ pipeline always uses LTX_2_3_HQ_PARAMS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ltx2_tp.compat import ensure_ltx_imports
from ltx2_tp.distributed.collectives import gather_guidance_passes
from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.models.ltx2.inputs import (SKIP_A2V, SKIP_AUDIO_SELF_ATTN, SKIP_V2A, SKIP_VIDEO_SELF_ATTN,
                                        Perturbations)
from ltx2_tp.pipelines.components import LTX2Components
from ltx2_tp.pipelines.request import GenerationRequest, RequestError

ensure_ltx_imports()

from ltx_core.components.guiders import (MultiModalGuider, MultiModalGuiderFactory,  # noqa: E402
                                         MultiModalGuiderParams, create_multimodal_guider_factory)
from ltx_core.model.transformer.model import X0Model  # noqa: E402
from ltx_pipelines.utils.constants import LTX_2_3_PARAMS, LTX_2_PARAMS, PipelineParams, detect_params  # noqa: E402
from ltx_pipelines.utils.helpers import modality_from_latent_state  # noqa: E402

PASS_NAMES = ("cond", "uncond", "perturbed", "isolated")  # at most 4 DiT passes a step
from ltx2_tp.memory.planner import guidance_batched  # noqa: E402

TINY_STEPS = 8  # the embedded tiny model's default: a CPU smoke run in seconds


def batch_guidance_passes(c: LTX2Components, video_tokens: int) -> bool:
    """Run a step's guidance passes as one forward: the planner's rule (memory/planner.py), per rank."""
    return guidance_batched(-(-video_tokens // c.transformer.ctx.sp_size))


# ---- defaults per model version ------------------------------------------------------------------

def default_params(cfg, checkpoint_path: str | None = None, tiny: bool = False,
                   base: PipelineParams | None = None) -> PipelineParams:
    """ltx-pipelines' defaults for a model: from the checkpoint's metadata, as its entry points read
    them; for a model without a file (random weights) by architecture (cross-attention AdaLN is
    LTX-2.3's). STG blocks the model lacks become its last block (the tiny model has 2 blocks)."""
    if base is None:
        if checkpoint_path:
            base = detect_params(checkpoint_path)
        else:
            base = LTX_2_3_PARAMS if cfg.cross_attention_adaln else LTX_2_PARAMS
    n = cfg.num_layers

    def fit(p: MultiModalGuiderParams) -> MultiModalGuiderParams:
        if p.stg_blocks and max(p.stg_blocks) >= n:
            return replace(p, stg_blocks=[n - 1])
        return p

    params = replace(base, video_guider_params=fit(base.video_guider_params),
                     audio_guider_params=fit(base.audio_guider_params))
    return replace(params, num_inference_steps=TINY_STEPS) if tiny else params


def request_guidance(req: GenerationRequest, params: PipelineParams, num_layers: int
                     ) -> tuple[MultiModalGuiderParams, MultiModalGuiderParams]:
    """The request's guidance fields over the defaults (ltx-pipelines' argument -> field mapping)."""
    v, a = params.video_guider_params, params.audio_guider_params

    def pick(value, default):
        return default if value is None else value

    video = MultiModalGuiderParams(
        cfg_scale=float(req.guidance_scale), stg_scale=pick(req.video_stg_guidance_scale, v.stg_scale),
        rescale_scale=pick(req.video_rescale_scale, v.rescale_scale),
        modality_scale=pick(req.a2v_guidance_scale, v.modality_scale), skip_step=pick(req.video_skip_step, v.skip_step),
        stg_blocks=_list(pick(req.video_stg_blocks, v.stg_blocks)))
    audio = MultiModalGuiderParams(
        cfg_scale=pick(req.audio_cfg_guidance_scale, a.cfg_scale), stg_scale=pick(req.audio_stg_guidance_scale, a.stg_scale),
        rescale_scale=pick(req.audio_rescale_scale, a.rescale_scale),
        modality_scale=pick(req.v2a_guidance_scale, a.modality_scale), skip_step=pick(req.audio_skip_step, a.skip_step),
        stg_blocks=_list(pick(req.audio_stg_blocks, a.stg_blocks)))
    check_stg_blocks(req, num_layers)
    return video, audio


def check_stg_blocks(req: GenerationRequest, num_layers: int) -> None:
    for name in ("video_stg_blocks", "audio_stg_blocks"):
        bad = [b for b in getattr(req, name) or () if not 0 <= b < num_layers]
        if bad:
            raise RequestError(name, f"block indices must be between 0 and {num_layers - 1} (this model has "
                               f"{num_layers} blocks), got {bad}")


def _list(blocks):
    return None if blocks is None else list(blocks)  # None: every block (ltx-core's Perturbation)


# ---- the passes of a step --------------------------------------------------------------------------

@dataclass(frozen=True)
class GuidancePass:
    """One DiT evaluation of a guided step: its contexts, which streams run, what it perturbs."""

    name: str  # cond | uncond | perturbed | isolated
    video_context: torch.Tensor
    audio_context: torch.Tensor
    video_enabled: bool
    audio_enabled: bool
    skips: tuple[tuple[str, tuple[int, ...] | None], ...] = ()

    def key(self):  # passes with equal keys can share one forward
        return (self.video_enabled, self.audio_enabled, tuple(self.video_context.shape), tuple(self.audio_context.shape))


def step_passes(vg: MultiModalGuider, ag: MultiModalGuider, pos, step: int) -> list[GuidancePass]:
    """The passes ltx-pipelines' multi_modal_guider_denoising_func runs for this step, in its order."""
    on_v, on_a = not vg.should_skip_step(step), not ag.should_skip_step(step)
    passes = [GuidancePass("cond", pos[0], pos[1], on_v, on_a)]
    if vg.do_unconditional_generation() or ag.do_unconditional_generation():
        for g in (vg, ag):
            if g.do_unconditional_generation() and g.negative_context is None:
                raise ValueError("Negative context is required for unconditioned denoising")
        neg_v = vg.negative_context if vg.negative_context is not None else pos[0]
        neg_a = ag.negative_context if ag.negative_context is not None else pos[1]
        passes.append(GuidancePass("uncond", neg_v, neg_a, True, True))  # as ltx-pipelines: both streams on
    if vg.do_perturbed_generation() or ag.do_perturbed_generation():
        skips = []
        if vg.do_perturbed_generation():
            skips.append((SKIP_VIDEO_SELF_ATTN, _blocks(vg.params.stg_blocks)))
        if ag.do_perturbed_generation():
            skips.append((SKIP_AUDIO_SELF_ATTN, _blocks(ag.params.stg_blocks)))
        passes.append(GuidancePass("perturbed", pos[0], pos[1], on_v, on_a, tuple(skips)))
    if vg.do_isolated_modality_generation() or ag.do_isolated_modality_generation():
        passes.append(GuidancePass("isolated", pos[0], pos[1], on_v, on_a, ((SKIP_A2V, None), (SKIP_V2A, None))))
    return passes


def _blocks(blocks):
    return None if blocks is None else tuple(blocks)


def run_passes(model, passes: list[GuidancePass], video_state, audio_state, sigma: torch.Tensor, batch: bool
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (denoised video, denoised audio). With `batch`, passes that can share a forward do."""
    groups: dict = {}
    for p in passes:
        groups.setdefault(p.key() if batch else p.name, []).append(p)
    out = {}
    for group in groups.values():
        v = [modality_from_latent_state(video_state, p.video_context, sigma, p.video_enabled) for p in group]
        a = [modality_from_latent_state(audio_state, p.audio_context, sigma, p.audio_enabled) for p in group]
        pert = Perturbations([[(kind, None if b is None else list(b)) for kind, b in p.skips] for p in group],
                             same_inputs_as=tuple(_same_inputs(group, j) for j in range(len(group))))
        dv, da = model(video=stack_modalities(v), audio=stack_modalities(a), perturbations=pert)
        for p, pv, pa in zip(group, dv.split(1), da.split(1)):
            out[p.name] = (pv, pa)
    return out


def _same_inputs(group: list[GuidancePass], j: int) -> int | None:
    """The first earlier pass with the same inputs as pass j (same context tensors and streams: the
    latent and sigma are the step's): the DiT then runs only the blocks where their skips differ
    (the STG pass = the cond pass until its first STG block)."""
    p = group[j]
    return next((i for i, q in enumerate(group[:j]) if q.video_context is p.video_context
                 and q.audio_context is p.audio_context and q.video_enabled == p.video_enabled
                 and q.audio_enabled == p.audio_enabled), None)


def passes_per_step(video: MultiModalGuiderParams, audio: MultiModalGuiderParams) -> int:
    """The passes a guided step runs with these params (step 0, always guided): 1 to 4."""
    x = torch.zeros(1)  # stands for the contexts: only the count matters
    return len(step_passes(MultiModalGuider(video, x), MultiModalGuider(audio, x), (x, x), 0))


def split_passes(passes: list[GuidancePass], groups: int) -> list[list[GuidancePass]]:
    """Group k runs passes k, k + G, ...: 4 over 2 -> (cond, perturbed) | (uncond, isolated), 2
    each; 3 over 2 -> (cond, perturbed) | (uncond): the step costs one batch-2 forward instead of
    one batch-3 (passes are indivisible; the idle third of group 1 is the price)."""
    return [passes[k::groups] for k in range(groups)]


def run_passes_parallel(model, passes: list[GuidancePass], video_state, audio_state, sigma: torch.Tensor,
                        batch: bool, ctx: ParallelContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """run_passes over the guidance groups: this rank's group runs its share, then one all-gather of
    (passes x latent) gives every rank every pass's outputs (bit-equal on every rank)."""
    if ctx.guidance_size == 1:
        return run_passes(model, passes, video_state, audio_state, sigma, batch)
    shares = split_passes(passes, ctx.guidance_size)
    mine = shares[ctx.guidance_rank]
    out = run_passes(model, mine, video_state, audio_state, sigma, batch) if mine else {}
    vshape, ashape = video_state.latent.shape, audio_state.latent.shape  # the denoised outputs' shapes
    nv = video_state.latent.numel()
    send = video_state.latent.new_zeros(max(len(s) for s in shares), nv + audio_state.latent.numel())
    for i, p in enumerate(mine):
        send[i, :nv], send[i, nv:] = out[p.name][0].reshape(-1), out[p.name][1].reshape(-1)
    got = gather_guidance_passes(send, ctx.guidance_group)
    return {p.name: (got[g, i, :nv].view(vshape), got[g, i, nv:].view(ashape))
            for g, share in enumerate(shares) for i, p in enumerate(share)}


def stack_modalities(ms):
    """Batch-1 Modality inputs as one of batch len(ms) (sigma per sample)."""
    if len(ms) == 1:
        return ms[0]

    def cat(name):
        xs = [getattr(m, name) for m in ms]
        return None if xs[0] is None else torch.cat(xs)

    m = ms[0]
    return replace(m, latent=cat("latent"), timesteps=cat("timesteps"), positions=cat("positions"),
                   context=cat("context"), context_mask=cat("context_mask"), attention_mask=cat("attention_mask"),
                   sigma=torch.cat([x.sigma.reshape(-1) for x in ms]))


# ---- the denoising function --------------------------------------------------------------------------

def guided_denoise_fn(c: LTX2Components, ctx_pos, ctx_neg, video: MultiModalGuiderParams | MultiModalGuiderFactory,
                      audio: MultiModalGuiderParams | MultiModalGuiderFactory, batch: bool | None = None,
                      audio_negative: bool = True):
    """ltx-pipelines' multi_modal_guider_factory_denoising_func over our DiT (see the module doc).
    `batch` None: `batch_guidance_passes` decides per step; True / False force one way.
    `audio_negative` False: the audio guider has no negative context, so the text-unconditional pass
    gives the audio the prompt's context (ltx-pipelines' A2Vid builds its audio guider so)."""
    model = X0Model(c.transformer)
    video_factory = create_multimodal_guider_factory(video, negative_context=ctx_neg[0])
    audio_factory = create_multimodal_guider_factory(audio, negative_context=ctx_neg[1] if audio_negative else None)
    last: list = [None, None]
    host: list = [None, None]  # (sigmas, their values): read once a stage, not once a step (a sync each)

    def step(video_state, audio_state, sigmas, step_index):  # ltx-pipelines' DenoisingFunc signature
        i, sigma = step_index, sigmas[step_index]
        if host[0] is not sigmas:
            host[:] = [sigmas, sigmas.tolist()]
        vg, ag = video_factory.build_from_sigma(host[1][i]), audio_factory.build_from_sigma(host[1][i])
        skip_v, skip_a = vg.should_skip_step(i), ag.should_skip_step(i)
        if skip_v and skip_a:
            return last[0], last[1]
        together = batch if batch is not None else batch_guidance_passes(c, video_state.latent.shape[1])
        out = run_passes_parallel(model, step_passes(vg, ag, ctx_pos, i), video_state, audio_state, sigma, together,
                                  c.ctx)

        def terms(k):  # the passes not run enter ltx-core's formula as 0.0, as in ltx-pipelines
            return [out[n][k] if n in out else 0.0 for n in PASS_NAMES[1:]]

        dv = last[0] if skip_v else vg.calculate(out["cond"][0], *terms(0))
        da = last[1] if skip_a else ag.calculate(out["cond"][1], *terms(1))
        last[:] = [dv, da]
        return dv, da

    return step


def cfg_only(scale: float) -> MultiModalGuiderParams:
    """Plain CFG on both streams (the multimodal guider with STG, modality guidance and rescale off)."""
    return MultiModalGuiderParams(cfg_scale=scale)
