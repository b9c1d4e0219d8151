"""The activation budget (issue 15): two-pass self-attention, the offload tiers, the formula, the plan rule.

- Two-pass self-attention (K/V of every token first, then queries per chunk) equals the one-pass
  model and ltx-core (fp32, relative max error <= 1e-5): several chunks, an uneven last chunk,
  STG skipping some samples, gated attention with cross-attention AdaLN, communication chunks.
- The offload tiers equal the resident two-pass model: the parked residual bit for bit (the same
  arithmetic on the same numbers: only copies added); K/V streamed in blocks within 1e-5 (attention
  over blocks merged by log-sum-exp in fp32 instead of one kernel over all keys).
- TP=2, Ulysses=2 (with head groups) and ring=2 over gloo, small chunks and each tier, equal the
  single-process model; under each layout the formula is within 10% of the probe's peak.
- A dispatch-mode probe (memory_probe.py) bounds what is alive: two-pass, no tensor but the residual,
  K and V is larger than a few chunks, and the peak is residual + K + V + a stated multiple of a
  chunk; with K/V and the residual parked, nothing is larger than a few chunks.
- memory/estimate.py's formula is within 10% of the probe's peak at several sizes, tiers, dtypes.
- PlanRule(activation_budget_bytes) picks the fastest plan that fits, and the model runs it.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from memory_probe import LiveTensors
from reference import TOL, build_ltx_core, make_inputs, rel_err, run_ltx_core, tiny_config

from ltx2_tp.latent_grid import LatentGrid, tokens_per_rank
from ltx2_tp.memory.estimate import StepShape, activation_bytes, estimate_activations
from ltx2_tp.memory.plan import ExecutionPlan, PlanRule, plan_within
from ltx2_tp.models.ltx2.config import get_config
from ltx2_tp.models.ltx2.inputs import SKIP_VIDEO_SELF_ATTN, Perturbations
from ltx2_tp.models.ltx2.weights import build_model, official_state_dict

# proportions closer to the 19B model than the tiny preset's (in/out channels 1/8 of the inner dim)
PROBE_CFG = dict(num_layers=1, rope_type="split", double_precision_rope=True, num_attention_heads=4,
                 attention_head_dim=16, cross_attention_dim=64, audio_num_attention_heads=4, audio_attention_head_dim=8,
                 audio_cross_attention_dim=32, in_channels=8, out_channels=8, audio_in_channels=8, audio_out_channels=8,
                 caption_channels=48)
TWO_PASS = [
    ExecutionPlan(attn_chunk_tokens=16, ffn_chunk_tokens=16),  # 60 tokens: 4 chunks, the last of 12
    ExecutionPlan(attn_chunk_tokens=7, cache_rope=False),  # 9 chunks, the last of 4; RoPE per chunk
    ExecutionPlan(attn_chunk_tokens=13, comm_chunk_tokens=5),  # pass 2 in chunks of 5
]
TIERS = [
    ExecutionPlan(attn_chunk_tokens=16, residual_offload=True),
    ExecutionPlan(attn_chunk_tokens=16, kv_offload=True, kv_block_tokens=11),
    ExecutionPlan(attn_chunk_tokens=13, comm_chunk_tokens=5, kv_offload=True, residual_offload=True, kv_block_tokens=7,
                  cache_rope=False),
    ExecutionPlan(kv_offload=True),  # one query chunk, one K/V block
]


def _stg(batch: int) -> Perturbations:
    return Perturbations([[(SKIP_VIDEO_SELF_ATTN, [1])]] + [[] for _ in range(batch - 1)])


@pytest.fixture(scope="module")
def gated_model():
    cfg = tiny_config(apply_gated_attention=True, cross_attention_adaln=True, caption_projection=False,
                      rope_type="split")
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg, frames=4, h=3, w=5, audio_tokens=13)  # 60 video tokens, 13 audio, batch 2
    return model, (v, a), model(v, a), model(v, a, _stg(2))


@pytest.mark.parametrize("plan", TWO_PASS, ids=["4_chunks", "9_chunks_uncached_rope", "comm_chunks"])
def test_two_pass_equals_one_pass(gated_model, plan):
    model, (v, a), (rv, ra), (sv, sa) = gated_model
    assert plan.two_pass(v.latent.shape[1])
    ov, oa = model(v, a, plan=plan)
    pv, pa = model(v, a, _stg(2), plan=plan)  # STG: the first sample passes v through, the second attends
    errs = [rel_err(ov, rv), rel_err(oa, ra), rel_err(pv, sv), rel_err(pa, sa)]
    assert max(errs) <= TOL, errs


def test_two_pass_equals_ltx_core():
    pytest.importorskip("ltx_core")
    cfg = tiny_config(rope_type="split", double_precision_rope=True, apply_gated_attention=True,
                      av_ca_timestep_scale_multiplier=1000.0)
    ref = build_ltx_core(cfg)
    ours = build_model(cfg, dtype=torch.float32, state_dict=ref.state_dict())
    v, a = make_inputs(cfg, frames=3, h=3, w=5, audio_tokens=11)  # 45 video tokens
    rv, ra = run_ltx_core(ref, v, a)
    for plan in (ExecutionPlan(attn_chunk_tokens=10, ffn_chunk_tokens=7), TIERS[2]):
        ov, oa = ours(v, a, plan=plan)
        assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL, (plan, rel_err(ov, rv), rel_err(oa, ra))


@pytest.mark.parametrize("i", range(len(TIERS)), ids=["residual", "kv_blocks", "kv_and_residual", "kv_one_block"])
def test_offload_tiers_equal_resident(gated_model, i):
    model, (v, a), (rv, ra), (sv, sa) = gated_model
    tier = TIERS[i]
    resident = ExecutionPlan(attn_chunk_tokens=tier.attn_chunk_tokens, comm_chunk_tokens=tier.comm_chunk_tokens,
                             cache_rope=tier.cache_rope)
    for pert, (full_v, full_a) in ((None, (rv, ra)), (_stg(2), (sv, sa))):
        ov, oa = model(v, a, pert, plan=tier)
        qv, qa = model(v, a, pert, plan=resident)
        if not tier.kv_offload:  # only copies were added: the same arithmetic on the same numbers
            assert torch.equal(ov, qv) and torch.equal(oa, qa)
        assert rel_err(ov, qv) <= TOL and rel_err(oa, qa) <= TOL
        assert rel_err(ov, full_v) <= TOL and rel_err(oa, full_a) <= TOL


def test_offload_refusals():
    cfg = tiny_config()
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg, frames=2, h=2, w=3, audio_tokens=5)
    mask = torch.ones(2, 12, 12)
    from dataclasses import replace

    with pytest.raises(NotImplementedError, match="kv_offload with a self-attention mask"):
        model(replace(v, attention_mask=mask), a, plan=ExecutionPlan(kv_offload=True))
    with pytest.raises(ValueError, match="kv_offload needs ulysses_head_groups=1"):
        ExecutionPlan(kv_offload=True, ulysses_head_groups=2)


# ---- parallel layouts --------------------------------------------------------------------------------
LAYOUT_PLANS = [
    ExecutionPlan(attn_chunk_tokens=5, ffn_chunk_tokens=7, cache_rope=False),  # uneven chunks and parts
    ExecutionPlan(attn_chunk_tokens=6, comm_chunk_tokens=4, ulysses_head_groups=2),
    ExecutionPlan(attn_chunk_tokens=5, residual_offload=True),
    ExecutionPlan(attn_chunk_tokens=6, kv_offload=True, kv_block_tokens=9),
    ExecutionPlan(attn_chunk_tokens=4, kv_offload=True, residual_offload=True, kv_block_tokens=5, cache_rope=False),
]
PROBE_PLANS = [ExecutionPlan(attn_chunk_tokens=32, ffn_chunk_tokens=32, cache_rope=False),
               ExecutionPlan(attn_chunk_tokens=64, ffn_chunk_tokens=32, kv_offload=True, residual_offload=True,
                             kv_block_tokens=160)]


def _layouts(rank, world, cfg, sd, inputs, ref, stg_ref, probe_sd):
    from ltx2_tp.distributed.context import build_groups

    errs, ratios = {}, {}
    probe_cfg = tiny_config(**PROBE_CFG)
    pv, pa = make_inputs(probe_cfg, batch=1, frames=8, h=8, w=8, audio_tokens=25, text=6, dtype=torch.bfloat16)
    for lay in [(2, 1, 1), (1, 2, 1), (1, 1, 2)]:
        ctx = build_groups(*lay)
        model = build_model(cfg, ctx, dtype=torch.float32, state_dict=sd)
        for i, plan in enumerate(LAYOUT_PLANS):
            if lay[2] > 1 and plan.kv_offload:
                with pytest.raises(ValueError, match="kv_offload is not supported with ring attention"):
                    model(*inputs, plan=plan)
                continue
            ov, oa = model(*inputs, plan=plan)
            qv, qa = model(*inputs, _stg(inputs[0].latent.shape[0]), plan=plan)
            errs[(lay, i)] = max(rel_err(ov, ref[0]), rel_err(oa, ref[1]), rel_err(qv, stg_ref[0]), rel_err(qa, stg_ref[1]))
        probe_model = build_model(probe_cfg, ctx, dtype=torch.bfloat16, state_dict=probe_sd)
        for i, plan in enumerate(PROBE_PLANS):
            if lay[2] > 1 and plan.kv_offload:
                plan = ExecutionPlan(attn_chunk_tokens=64, ffn_chunk_tokens=32, residual_offload=True)
            probe_model(pv, pa, plan=plan)  # pooled host buffers exist before the probe
            with LiveTensors() as probe:
                probe_model(pv, pa, plan=plan)
            shape = StepShape(tokens_per_rank(512, lay[1] * lay[2]), 25, 6, 1, *lay, dtype_bytes=2)
            ratios[(lay, i)] = activation_bytes(probe_cfg, plan, shape) / probe.peak
    return errs, ratios


def test_layouts_two_pass_and_tiers():
    cfg = tiny_config(apply_gated_attention=True, rope_type="split")
    model = build_model(cfg, dtype=torch.float32, seed=11)
    inputs = make_inputs(cfg, frames=3, h=3, w=5, audio_tokens=11)  # 45 video tokens: parts of 23 and 22
    ref, stg_ref = model(*inputs), model(*inputs, _stg(2))
    probe_sd = official_state_dict(build_model(tiny_config(**PROBE_CFG), dtype=torch.bfloat16, seed=3))
    results = run_distributed(_layouts, 2, cfg, official_state_dict(model), inputs, ref, stg_ref, probe_sd)
    for errs, ratios in results:
        assert all(e <= TOL for e in errs.values()), errs
        assert all(0.9 <= r <= 1.1 for r in ratios.values()), ratios


# ---- the probe: what is alive --------------------------------------------------------------------------
def _probe_run(plan, frames=8, dtype=torch.float32, batch=1, **cfg_kw):
    cfg = tiny_config(**{**PROBE_CFG, **cfg_kw})
    model = build_model(cfg, dtype=dtype, seed=2)
    v, a = make_inputs(cfg, batch=batch, frames=frames, h=8, w=8, audio_tokens=25, text=6, dtype=dtype)
    model(v, a, plan=plan)  # pooled host buffers exist before the probe
    n = v.latent.shape[1]
    chunk = batch * (plan.attn_chunk_tokens or n) * cfg.inner_dim * dtype.itemsize
    with LiveTensors(big=4 * chunk) as probe:
        model(v, a, plan=plan)
    shape = StepShape(n, 25, 6, batch, dtype_bytes=dtype.itemsize)
    return probe, estimate_activations(cfg, plan, shape), batch * n * cfg.inner_dim * dtype.itemsize, chunk


def test_live_tensors_bounded_by_residual_kv_and_a_chunk():
    # one pass, 512 tokens: whole-sequence q, k, v (the fused GEMM output), rotated q and k, output
    one, _, unit, _ = _probe_run(ExecutionPlan(ffn_chunk_tokens=32))
    assert one.peak >= 7 * unit
    # two passes, 16 chunks of 32: residual + K + V, and nothing else above 4 chunks
    two, _, unit, chunk = _probe_run(ExecutionPlan(attn_chunk_tokens=32, ffn_chunk_tokens=16, cache_rope=False))
    assert two.big_max <= 3, two.big_ops  # the residual, K and V
    assert two.peak <= 3 * unit + 12 * chunk, (two.peak / chunk, two.at_peak[:12])
    # K/V parked (blocks of 64 keys: two slots of K and V, 4 chunks each) and the residual too: nothing
    # above 4 chunks, the peak 24 chunks, and it does not grow with the video but by its AdaLN index
    # (8 bytes a token)
    parked = ExecutionPlan(attn_chunk_tokens=32, ffn_chunk_tokens=16, cache_rope=False, kv_offload=True,
                           kv_block_tokens=64, residual_offload=True)
    short, _, _, chunk = _probe_run(parked, frames=4)
    long, _, _, _ = _probe_run(parked, frames=8)
    assert short.big_max == 0 and long.big_max == 0, long.big_ops
    assert long.peak <= 24 * chunk, (long.peak / chunk, long.at_peak[:12])  # sub-layer work, K/V slots, audio, text
    assert long.peak - short.peak <= 256 * 8, (short.peak, long.peak)


@pytest.mark.parametrize("case", [
    dict(plan=ExecutionPlan(ffn_chunk_tokens=48)),  # 512 tokens
    dict(plan=ExecutionPlan(attn_chunk_tokens=48, ffn_chunk_tokens=48, cache_rope=False)),
    dict(plan=ExecutionPlan(attn_chunk_tokens=64, ffn_chunk_tokens=32), frames=16, dtype=torch.bfloat16),
    dict(plan=ExecutionPlan(attn_chunk_tokens=96, ffn_chunk_tokens=48, kv_offload=True, kv_block_tokens=256,
                            cache_rope=False), frames=12, dtype=torch.bfloat16),
    dict(plan=ExecutionPlan(attn_chunk_tokens=64, ffn_chunk_tokens=64, kv_offload=True, residual_offload=True,
                            kv_block_tokens=128), dtype=torch.bfloat16, batch=2),
    dict(plan=ExecutionPlan(attn_chunk_tokens=100, ffn_chunk_tokens=50, comm_chunk_tokens=25),
         dtype=torch.bfloat16, rope_type="interleaved", apply_gated_attention=True, cross_attention_adaln=True,
         caption_projection=False),
], ids=["one_pass", "two_pass_fp32", "two_pass_cached_rope_bf16", "kv_offload_bf16", "all_parked_batch2",
        "interleaved_adaln_gated"])
def test_formula_within_10_percent_of_probe(case):
    case = dict(case)
    probe, est, _, _ = _probe_run(case.pop("plan"), **case)
    assert 0.9 <= est.peak / probe.peak <= 1.1, (est.peak, probe.peak, est.peak_phase)


# ---- the plan rule ------------------------------------------------------------------------------
def test_plan_within_budget_19b():
    cfg = get_config("ltx-2-19b")
    gib = 2**30
    g = LatentGrid(1441, 1088, 1920)  # 369,240 video tokens
    shape = StepShape(g.video_tokens, g.audio_tokens(24.0), 1024, 1)
    tiers = []
    for budget in (40, 18, 8, 4, 2):
        plan, nbytes, fits = plan_within(cfg, shape, budget * gib)
        assert fits and nbytes <= budget * gib and nbytes == activation_bytes(cfg, plan, shape)
        tiers.append((plan.two_pass(shape.video_tokens), plan.kv_offload, plan.residual_offload))
    assert tiers == [(False, False, False), (True, False, False), (True, True, False), (True, True, True),
                     (True, True, True)], tiers
    small = StepShape(LatentGrid(121, 1088, 1920).video_tokens, 126, 1024, 1)  # 1080p x 121: one pass
    assert plan_within(cfg, small, 24 * gib)[0] == ExecutionPlan(cache_rope=True)
    plan, nbytes, fits = plan_within(cfg, shape, 0.1 * gib)
    assert not fits and plan.kv_offload and plan.residual_offload  # the least it can do, for the planner
    # Ulysses: K/V streamed only when every query chunk of the group holds >= 16K tokens
    plan, _, fits = plan_within(cfg, StepShape(tokens_per_rank(g.video_tokens, 2), 1501, 1024, 1, ulysses=2), 4 * gib)
    assert fits and plan.kv_offload and plan.ulysses_head_groups == 1 and plan.attn_chunk_tokens * 2 >= 16384
    plan, _, _ = plan_within(cfg, StepShape(tokens_per_rank(g.video_tokens, 2), 1501, 1024, 1, ring=2), 4 * gib)
    assert not plan.kv_offload  # ring attention keeps its K/V blocks


def test_plan_rule_budget_runs_within_it():
    cfg = tiny_config(**PROBE_CFG)
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg, batch=1, frames=16, h=8, w=8, audio_tokens=25, text=6)
    ref = model(v, a)
    unit = 1024 * cfg.inner_dim * 4
    for budget in (20 * unit, 4 * unit, 1.5 * unit):  # one pass; two passes; K/V and residual parked
        model.plan_rule = PlanRule(activation_budget_bytes=budget)
        plan = model.execution_plan(1024, 25, 6, 1, True, 4)
        model(v, a)  # pooled host buffers exist before the probe
        with LiveTensors() as probe:
            out = model(v, a)
        assert probe.peak <= 1.1 * budget, (plan, probe.peak / unit)
        assert rel_err(out[0], ref[0]) <= TOL and rel_err(out[1], ref[1]) <= TOL
    assert plan.kv_offload and plan.residual_offload
    model.plan_rule = PlanRule()  # the default rule: unchanged
    assert model.execution_plan(1024) == ExecutionPlan(cache_rope=True)


def test_compiled_two_pass_block_is_one_graph():
    """Two-pass attention traced with the rest of a block: one graph for every block on one GPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from ltx2_tp.compile import compile_blocks

    torch._dynamo.reset()
    cfg = tiny_config(apply_gated_attention=True)
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg, frames=4, h=3, w=5, audio_tokens=13)
    plan = ExecutionPlan(attn_chunk_tokens=16, ffn_chunk_tokens=8, cache_rope=False)
    with torch.no_grad():
        rv, ra = model(v, a)
        counter = CompileCounterWithBackend("eager")
        compile_blocks(model, backend=counter)
        ov, oa = model(v, a, plan=plan)
    assert counter.frame_count == 1, counter.frame_count
    assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL
    torch._dynamo.reset()
