"""Guidance-parallel (pipelines/guidance.py) equals one process: the two-stage pipeline's final
latents at tiny size, fp32, gloo, with G=2 guidance groups (2 processes), G=2 x Ulysses SP=2 and
G=4 (4 processes); relative max error <= 1e-5 (reference.TOL), and every rank holds the same
latents to the bit. Most of the time is the workers' imports (compute: ~3 s a world).

Requests: the official LTX-2 guidance (4 passes a step: 2 per group) with a skip_step schedule
(video guided on even steps, audio every third: steps with both, one or no guider), the same
without modality guidance (3 passes over 2 groups), and every guidance term off (1 pass: one
group idles and still joins each step's gather).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from reference import TOL, rel_err

from ltx2_tp.pipelines.guidance import passes_per_step, split_passes

SIZE = dict(width=64, height=64, num_frames=9)  # stage 1: 32x32 (one latent cell), 2 latent frames
REQUESTS = {  # name: (request fields, passes per guided step)
    "official_skip_steps": (dict(video_skip_step=1, audio_skip_step=2), 4),
    "no_modality_guidance": (dict(a2v_guidance_scale=1.0, v2a_guidance_scale=1.0), 3),
    "one_pass": (dict(guidance_scale=1.0, audio_cfg_guidance_scale=1.0, video_stg_guidance_scale=0.0,
                      audio_stg_guidance_scale=0.0, a2v_guidance_scale=1.0, v2a_guidance_scale=1.0), 1),
}
STEPS = 5  # steps 0..4: with the skip schedule, both guided (0), none (1), video only (2, 4), audio only (3)


def _request(fields):
    from ltx2_tp.pipelines.request import GenerationRequest

    return GenerationRequest("a red fox", "blurry", seed=3, num_inference_steps=STEPS, video_stg_blocks=[1],
                             audio_stg_blocks=[1], **SIZE, **fields)


def _latents(ctx=None):
    """name -> (video, audio) final latents of LTX2TwoStagePipeline on the tiny components."""
    from ltx2_tp.pipelines import stages
    from ltx2_tp.pipelines.base import Run
    from ltx2_tp.pipelines.tiny import build_tiny_components
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

    kw = {} if ctx is None else {"ctx": ctx}
    pipe = LTX2TwoStagePipeline(build_tiny_components(0, **kw))
    out = {}
    for name, (fields, _) in REQUESTS.items():
        req = _request(fields)
        pipe.check(req)
        pos, neg = stages.encode_text(pipe.c, req.prompt, req.negative_prompt)
        run = Run(req, torch.Generator().manual_seed(req.seed), pos, neg, stages.StageTimer(), None)
        out[name] = pipe.latents(run)
    return out


def _parallel(rank, world, layouts):
    from ltx2_tp.distributed.context import build_groups

    return {lay: _latents(build_groups(*lay)) for lay in layouts}


@pytest.fixture(scope="module")
def reference():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _latents()
    finally:
        torch.set_num_threads(n)


# (tp, ulysses, ring, guidance)
# G=4 (world 4): one pass per group, and groups idle on the 3- and 1-pass requests
@pytest.mark.parametrize("world,layouts", [(2, [(1, 1, 1, 2)]), (4, [(1, 2, 1, 2), (1, 1, 1, 4)])],
                         ids=["G2", "G2xSP2_and_G4"])
def test_guidance_parallel_equals_single_process(reference, world, layouts):
    results = run_distributed(_parallel, world, layouts)
    errs = {}
    for rank, per_layout in enumerate(results):
        for lay, per_request in per_layout.items():
            for name, (v, a) in per_request.items():
                rv, ra = reference[name]
                assert v.shape == rv.shape and a.shape == ra.shape
                errs[(rank, lay, name)] = max(rel_err(v, rv), rel_err(a, ra))
                if rank:  # every rank holds the same latents, to the bit
                    v0, a0 = results[0][lay][name]
                    assert torch.equal(v, v0) and torch.equal(a, a0), (rank, lay, name)
    print("\n".join(f"{k}: {e:.2e}" for k, e in sorted(errs.items())))
    assert all(e <= TOL for e in errs.values()), errs


def test_passes_and_their_split():
    from ltx2_tp.pipelines.guidance import GuidancePass, request_guidance
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

    params = LTX2TwoStagePipeline.default_params(_tiny_cfg(), tiny=True)
    for name, (fields, n) in REQUESTS.items():
        assert passes_per_step(*request_guidance(_request(fields), params, 2)) == n, name
    x = torch.zeros(1, 1, 1)
    passes = [GuidancePass(n, x, x, True, True) for n in ("cond", "uncond", "perturbed", "isolated")]
    names = [[p.name for p in share] for share in split_passes(passes, 2)]
    assert names == [["cond", "perturbed"], ["uncond", "isolated"]]
    assert [[p.name for p in s] for s in split_passes(passes[:3], 2)] == [["cond", "perturbed"], ["uncond"]]
    assert [len(s) for s in split_passes(passes[:1], 2)] == [1, 0]


def _tiny_cfg():
    from ltx2_tp.models.ltx2.config import get_config

    return get_config("tiny")
