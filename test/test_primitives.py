"""The DiT's primitives on their own (fp32 CPU unless named; gloo for the collectives):

- ring attention over a process group equals attention over all keys;
- Ulysses packing round-trips (uneven parts, head groups) and seq -> heads -> seq is the identity;
- the log-sum-exp accumulator over K/V blocks equals attention over all keys;
- the chunked residual update equals the unchunked one, each chunk completed after the next is issued;
- a projection's `out_rows` equal the slice of the full projection (bf16 and fp8);
- fp8 + STG that skips a whole batch's video self-attention runs (it crashed in `v_only`);
- a TP=2 model whose heads have an odd size (interleaved RoPE pairs across heads) equals one rank.

Tolerance: relative max error <= 1e-5 (fp32) unless the arithmetic is the same (then bit-equal).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from reference import TOL, make_inputs, rel_err, tiny_config

from ltx2_tp.distributed.collectives import Pending, ulysses_heads_to_seq, ulysses_pack, ulysses_seq_to_heads, ulysses_unpack
from ltx2_tp.layers.attention_backend import LseAccumulator, attention, attention_lse
from ltx2_tp.layers.fp8 import FP8_ROWWISE, quantize_fp8
from ltx2_tp.layers.linear import MergedColumnParallelLinear
from ltx2_tp.models.ltx2.chunked import add_residual, stitch
from ltx2_tp.models.ltx2.inputs import SKIP_VIDEO_SELF_ATTN, Perturbations
from ltx2_tp.models.ltx2.weights import build_model, official_state_dict


def _qkv(n_q, n_k, seed=0, b=2, h=4, d=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=g) for n in (n_q, n_k, n_k))


def test_lse_accumulator_over_blocks_equals_full_attention():
    q, k, v = _qkv(7, 23)
    acc = LseAccumulator()
    for s, e in ((0, 5), (5, 6), (6, 23)):  # uneven blocks, one of a single key
        acc.add(*attention_lse(q, k[:, s:e], v[:, s:e]))
    assert rel_err(acc.out, attention(q, k, v)) <= TOL


def test_ulysses_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(1)
    for sizes, groups in (([3, 2], 1), ([3, 2], 2), ([4, 4], 2), ([2, 2, 1], 1)):
        u = len(sizes)
        for n in sorted(set(sizes)):  # this rank's part, padded to the largest when shorter
            x = torch.randn(2, n, 4 * u, 3, generator=g)
            packed = ulysses_pack(x, sizes, u, groups)
            assert packed.shape == (groups, u, 2, max(sizes), 4 * u // (groups * u), 3)
            assert torch.equal(ulysses_unpack(packed, n), x)


def test_chunked_residual_equals_unchunked_and_overlaps():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 6, generator=g)
    full, gate = torch.randn(2, 11, 6, generator=g), torch.randn(2, 11, 6, generator=g)
    events = []

    def branch(s, e, xc):  # xc: the residual's chunk (unused here)
        events.append(("issue", s))
        return Pending(None, lambda: events.append(("wait", s)) or full[:, s:e]), gate[:, s:e]

    for gated in (True, False):
        y, events[:] = x.clone(), []
        add_residual(y, [(0, 4), (4, 8), (8, 11)], branch if gated else lambda s, e, xc: (branch(s, e, xc)[0], None))
        assert torch.equal(y, x + full * gate if gated else x + full)
        # chunk i's output is waited for (its all-reduce) only after chunk i+1 was issued
        assert events == [("issue", 0), ("issue", 4), ("wait", 0), ("issue", 8), ("wait", 4), ("wait", 8)]


def test_stitch_equals_one_projection():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, 5, generator=g)

    def project(s, e):
        return h[:, s:e] * 2, None, h[:, s:e].sum(-1, keepdim=True)

    for chunks in ([(0, 9)], [(0, 4), (4, 8), (8, 9)], []):
        a, none, c = stitch(9 if chunks else 0, chunks, project)
        n = 9 if chunks else 0
        assert none is None and torch.equal(a, h[:, :n] * 2) and torch.equal(c, h[:, :n].sum(-1, keepdim=True))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_out_rows_equal_slice_of_full_projection(fp8):
    layer = MergedColumnParallelLinear(64, [32, 32, 48], ("a", "b", "c")).to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in layer.device_tensors().values():
            t.copy_(torch.randn(t.shape, generator=g))
        if fp8:
            FP8_ROWWISE.quantize(layer)
    assert set(layer.device_tensors()) == ({"weight_fp8", "weight_scale", "bias"} if fp8 else {"weight", "bias"})
    x = torch.randn(3, 5, 64, generator=g).bfloat16()
    with torch.no_grad():
        full = layer(x)
        for i in range(3):
            assert torch.equal(layer.forward_shard(x, i), full[i])


def test_fp8_with_stg_skipping_a_whole_batch():
    """STG skipping every sample's video self-attention takes the value projection alone
    (`Attention.v_only`); with fp8 weights it crashed with `mat2 must be a matrix`. It now gives the
    bf16 model's result up to fp8 noise, and the value the partial-STG path computes."""
    cfg = tiny_config(num_attention_heads=4, attention_head_dim=16, audio_attention_head_dim=16,
                      cross_attention_dim=64, audio_cross_attention_dim=64)
    ref = build_model(cfg, dtype=torch.bfloat16, seed=3)
    q = build_model(cfg, dtype=torch.bfloat16, seed=3)
    assert quantize_fp8(q) > 0 and q.transformer_blocks[1].attn1.to_qkv.quant_method is FP8_ROWWISE
    v, a = make_inputs(cfg, dtype=torch.bfloat16)
    skip_all = Perturbations([[(SKIP_VIDEO_SELF_ATTN, [1])], [(SKIP_VIDEO_SELF_ATTN, [1])]])
    skip_first = Perturbations([[(SKIP_VIDEO_SELF_ATTN, [1])], []])
    rv, _ = ref(v, a, skip_all)
    qv, qa = q(v, a, skip_all)
    pv, _ = q(v, a, skip_first)  # partial path: v from the fused q/k/v projection
    assert 0 < rel_err(qv.float(), rv.float()) < 0.1
    assert rel_err(qv[0].float(), pv[0].float()) < 1e-2  # bf16 rounding of the same fp8 products


def _distributed_checks(rank, world, odd_cfg, odd_sd, odd_inputs, odd_ref):
    import torch.distributed as dist

    from ltx2_tp.distributed.context import build_groups
    from ltx2_tp.distributed.ring import ring_attention

    out = {}
    # ring attention: uneven blocks, queries in chunks
    sizes = [5, 3]
    q, k, v = _qkv(8, 8, seed=5)
    s = sum(sizes[:rank])
    mine = slice(s, s + sizes[rank])
    o = ring_attention(q[:, mine], k[:, mine], v[:, mine], sizes, dist.group.WORLD, q_chunk=3)
    out["ring"] = rel_err(o, attention(q, k, v)[:, mine])
    # Ulysses: seq -> heads gathers the whole sequence for this rank's heads; heads -> seq inverts it
    x = torch.randn(2, 8, 4, 3, generator=torch.Generator().manual_seed(6))
    heads = ulysses_seq_to_heads(x[:, mine].contiguous(), sizes, dist.group.WORLD)
    out["seq_to_heads"] = torch.equal(heads, x[:, :, 2 * rank : 2 * rank + 2])
    out["round_trip"] = torch.equal(ulysses_heads_to_seq(heads, sizes, dist.group.WORLD), x[:, mine])
    # odd head size under TP=2: interleaved RoPE pairs cross heads, not ranks
    model = build_model(odd_cfg, build_groups(2, 1, 1), dtype=torch.float32, state_dict=odd_sd)
    ov, oa = model(*odd_inputs)
    out["odd_heads_tp2"] = max(rel_err(ov, odd_ref[0]), rel_err(oa, odd_ref[1]))
    return out


def test_distributed_primitives():
    cfg = tiny_config(num_attention_heads=4, attention_head_dim=5, cross_attention_dim=20,
                      audio_num_attention_heads=4, audio_attention_head_dim=3, audio_cross_attention_dim=12)
    model = build_model(cfg, dtype=torch.float32, seed=7)
    inputs = make_inputs(cfg, frames=2, h=2, w=3, audio_tokens=5)
    results = run_distributed(_distributed_checks, 2, cfg, official_state_dict(model), inputs, model(*inputs))
    for r in results:
        assert r["ring"] <= TOL and r["seq_to_heads"] and r["round_trip"] and r["odd_heads_tp2"] <= TOL, r


def test_config_refusals_name_the_field():
    with pytest.raises(ValueError, match="attention_head_dim=5 must be even with rope_type='split'"):
        tiny_config(rope_type="split", attention_head_dim=5, cross_attention_dim=20).validate()
    with pytest.raises(ValueError, match="multiple of 2 x num_attention_heads"):  # a<->v RoPE in video-head groups
        tiny_config(rope_type="split", num_attention_heads=8, attention_head_dim=4, audio_num_attention_heads=2,
                    audio_attention_head_dim=4, audio_cross_attention_dim=8).validate()
    with pytest.raises(ValueError, match="tp_size=2 leaves each rank 5 channels .* allowed tp_size values: \\[1\\]"):
        tiny_config(num_attention_heads=2, attention_head_dim=5, cross_attention_dim=10).validate_parallel(2)
    with pytest.raises(ValueError, match="rope_type must be"):
        build_model(tiny_config(rope_type="spiral"), dtype=torch.float32)
