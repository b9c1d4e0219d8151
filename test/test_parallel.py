"""Every TP / SP layout equals the single-process unchunked model (fp32, gloo, several processes).

Tolerance: relative max error <= 1e-5 (max |parallel - single| / max |single|) for video and audio.
Each spawned world runs all its layouts (groups are created per layout) to keep CI short.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from reference import TOL, make_inputs, rel_err, tiny_config

from ltx2_tp.distributed.context import build_groups
from ltx2_tp.memory.plan import ExecutionPlan
from ltx2_tp.models.ltx2.inputs import SKIP_VIDEO_SELF_ATTN, Perturbations
from ltx2_tp.models.ltx2.weights import build_model, official_state_dict

# (tp, ulysses, ring)
LAYOUTS = {2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
           4: [(4, 1, 1), (1, 4, 1), (1, 1, 4), (2, 2, 1), (2, 1, 2), (1, 2, 2)]}
CHUNKINGS = [ExecutionPlan(),
             ExecutionPlan(ffn_chunk_tokens=7, attn_chunk_tokens=5, cache_rope=False, comm_chunk_tokens=3),
             # communication overlap alone: TP all-reduce per 4 tokens, Ulysses in 2 head groups
             ExecutionPlan(comm_chunk_tokens=4, ulysses_head_groups=2)]
CASES = {  # name: (config overrides, make_inputs kwargs)
    "av_odd_tokens": (dict(), dict(frames=3, h=3, w=5, audio_tokens=11)),  # 45 video tokens
    "video_only_input": (dict(rope_type="split", double_precision_rope=True), dict(frames=2, h=3, w=3, audio_tokens=0)),
    "ltx23_like": (dict(rope_type="split", apply_gated_attention=True, cross_attention_adaln=True, caption_projection=False),
                   dict(frames=2, h=2, w=5, audio_tokens=6, per_token=False)),
    "fewer_tokens_than_ranks": (dict(), dict(frames=1, h=1, w=3, audio_tokens=4)),  # 3 tokens: a rank holds none
    "batch1_even_tokens": (dict(), dict(batch=1, frames=2, h=2, w=6, audio_tokens=5)),  # 24 tokens: copy-free Ulysses
}


def _reference(case):
    cfg_kw, in_kw = CASES[case]
    cfg = tiny_config(**cfg_kw)
    model = build_model(cfg, dtype=torch.float32, seed=11)
    v, a = make_inputs(cfg, **in_kw)
    return cfg, official_state_dict(model), (v, a), model(v, a), model(v, a, _stg(v.latent.shape[0]))


def _stg(batch: int) -> Perturbations:
    """STG on block 1's video self-attention for the first sample only (all of them at batch 1)."""
    return Perturbations([[(SKIP_VIDEO_SELF_ATTN, [1])]] + [[] for _ in range(batch - 1)])


def _check_layouts(rank, world, cases):
    errs = {}
    for tp, u, r in LAYOUTS[world]:
        ctx = build_groups(tp, u, r)
        for case, (cfg, sd, (v, a), (rv, ra), (pv, pa)) in cases.items():
            model = build_model(cfg, ctx, dtype=torch.float32, state_dict=sd)
            for i, plan in enumerate(CHUNKINGS):
                ov, oa = model(v, a, plan=plan)
                e = [rel_err(ov, rv)] + ([rel_err(oa, ra)] if ra is not None else [])
                if i == 1:  # STG perturbation path, chunked
                    qv, qa = model(v, a, _stg(v.latent.shape[0]), plan=plan)
                    e += [rel_err(qv, pv)] + ([rel_err(qa, pa)] if pa is not None else [])
                errs[(tp, u, r, case, i)] = max(e)
    return errs


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_single_process(world):
    cases = {c: _reference(c) for c in CASES}
    results = run_distributed(_check_layouts, world, cases)
    worst = {}
    for errs in results:
        for k, e in errs.items():
            worst[k] = max(worst.get(k, 0.0), e)
    bad = {k: e for k, e in worst.items() if not e <= TOL}
    print("\nmax rel err per (tp, ulysses, ring, case, chunked):")
    for k, e in sorted(worst.items()):
        print(f"  {k}: {e:.2e}")
    assert not bad, bad


def test_tp_refuses_non_dividing_heads():
    with pytest.raises(ValueError, match="tp_size=3 must divide num_attention_heads=4"):
        tiny_config().validate_parallel(3)
    with pytest.raises(ValueError, match="ulysses_size=4 must divide num_attention_heads/tp_size=2"):
        tiny_config().validate_parallel(2, 4)
