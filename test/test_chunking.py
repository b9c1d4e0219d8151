"""Sequence chunking: same output as unchunked, and no tokens x 4D (FFN) or tokens x 6D (AdaLN) tensor.

The memory probe is a TorchDispatchMode that records the size of every tensor any aten op
creates during a forward. Chunked, the largest is bounded by the hidden stream (tokens x D) and
does not grow with the FFN width; unchunked, the same probe sees tokens x 4D.
"""

from __future__ import annotations

import pytest
import torch
from reference import TOL, make_inputs, rel_err, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ltx2_tp.memory.plan import ExecutionPlan, plan_for
from ltx2_tp.models.ltx2.weights import build_model


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("plan", [ExecutionPlan(ffn_chunk_tokens=16, attn_chunk_tokens=16, cache_rope=False),
                                  ExecutionPlan(ffn_chunk_tokens=1), ExecutionPlan(attn_chunk_tokens=33)])
def test_chunked_equals_unchunked(plan):
    cfg = tiny_config(apply_gated_attention=True, rope_type="split")
    model = build_model(cfg, dtype=torch.float32, seed=2)
    v, a = make_inputs(cfg, frames=4, h=3, w=5, audio_tokens=13)
    rv, ra = model(v, a)
    ov, oa = model(v, a, plan=plan)
    assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL


def test_largest_tensor_bounded_when_chunked():
    cfg = tiny_config(num_layers=1)
    model = build_model(cfg, dtype=torch.float32, seed=2)
    b, frames, h, w = 1, 8, 8, 8
    v, a = make_inputs(cfg, batch=b, frames=frames, h=h, w=w, audio_tokens=9)
    t, d = frames * h * w, cfg.inner_dim

    probe = LargestTensor()
    with probe:
        model(v, a)
    assert probe.largest >= b * t * 4 * d, "probe must see the unchunked FFN activation"

    plan = ExecutionPlan(ffn_chunk_tokens=32, attn_chunk_tokens=32, cache_rope=False)
    probe = LargestTensor()
    with probe:
        model(v, a, plan=plan)
    # bounded by one hidden-stream-sized buffer (q/k/v/out of attention), never tokens x 4D or 6D
    assert probe.largest <= b * t * d, (probe.largest, probe.op, b * t * d)


def test_plan_chunks_only_when_needed():
    small = plan_for(6144)
    assert small.ffn_chunk_tokens is None and small.attn_chunk_tokens is None and small.cache_rope
    big = plan_for(367_200, budget_bytes=2 * 2**30)
    assert big.ffn_chunk_tokens and big.ffn_chunk_tokens * 4 * 4096 * 2 <= 2 * 2**30 and not big.cache_rope
    # communication overlap only with Ulysses and enough tokens for the pieces to stay efficient
    assert small.comm_chunk_tokens is None and small.ulysses_head_groups == 1
    assert plan_for(32_640, tp_size=2).comm_chunk_tokens is None  # measured no gain (plan.py)
    assert len(ExecutionPlan(comm_chunk_tokens=8160).out_chunks(32_640, None)) == 4
    assert len(ExecutionPlan(ffn_chunk_tokens=4096, comm_chunk_tokens=8160).out_chunks(32_640, 4096)) == 8
    assert plan_for(16_320, ulysses_size=2).ulysses_head_groups == 2
    assert plan_for(1536, ulysses_size=2).ulysses_head_groups == 1
