"""Compiled blocks: one graph per block shape on one GPU (no graph break), and the same output as eager."""

from __future__ import annotations

import torch
from reference import TOL, make_inputs, rel_err, tiny_config
from torch._dynamo.testing import CompileCounterWithBackend

from ltx2_tp.compile import compile_blocks
from ltx2_tp.models.ltx2.weights import build_model


def test_compiled_block_is_one_graph():
    torch._dynamo.reset()
    cfg = tiny_config(apply_gated_attention=True)
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg, frames=4, h=3, w=5, audio_tokens=13)
    with torch.no_grad():
        rv, ra = model(v, a)
        counter = CompileCounterWithBackend("eager")  # dynamo's graphs, run as traced: counts breaks cheaply
        compile_blocks(model, backend=counter)
        ov, oa = model(v, a)
    # Every block shares one graph: a second frame would mean a graph break inside the block
    # (e.g. the sequence-parallel attention, which is left eager only when sp_size > 1).
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for {len(model.transformer_blocks)} blocks"
    assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL
    torch._dynamo.reset()


def _compiled_layouts(rank, world, cfg, sd, inputs, ref, backend):
    from ltx2_tp.distributed.context import build_groups
    from ltx2_tp.memory.plan import ExecutionPlan

    errs = {}
    for lay in [(2, 1, 1), (1, 2, 1), (1, 1, 2)]:
        ctx = build_groups(*lay)
        torch._dynamo.reset()
        model = build_model(cfg, ctx, dtype=torch.float32, state_dict=sd)
        compile_blocks(model, backend=backend)
        with torch.no_grad():
            ov, oa = model(*inputs, plan=ExecutionPlan(comm_chunk_tokens=4, ulysses_head_groups=2))
        errs[lay] = max(rel_err(ov, ref[0]), rel_err(oa, ref[1]))
    torch._dynamo.reset()
    return errs


def test_compiled_layouts_equal_single_process():
    """Compiled blocks under TP=2, Ulysses=2 (2 head groups: the packing traced, the all-to-alls
    eager) and ring=2 equal the eager single-process model (dynamo's graphs run as traced; CPU)."""
    from dist_utils import run_distributed

    from ltx2_tp.models.ltx2.weights import official_state_dict

    cfg = tiny_config(apply_gated_attention=True, rope_type="split")
    model = build_model(cfg, dtype=torch.float32, seed=11)
    inputs = make_inputs(cfg, batch=1, frames=2, h=2, w=6, audio_tokens=5)
    with torch.no_grad():
        ref = model(*inputs)
    errs = run_distributed(_compiled_layouts, 2, cfg, official_state_dict(model), inputs, ref, "eager")
    worst = {k: max(e[k] for e in errs) for k in errs[0]}
    assert all(e <= TOL for e in worst.values()), worst
