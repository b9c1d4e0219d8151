"""Temporal-window attention (an opt-in approximation): its mechanics, exactly.

The window equals dense attention masked to the window (fp32, relative max error <= 1e-5), alone
and inside the whole DiT (against the model's own masked path: Modality.attention_mask = the
window's visibility), chunked; K >= frames - 1 is bit-identical to exact attention. Under Ulysses
and TP (gloo): test_approximations.py. Its deviation from exact attention over a whole run: benchmark/quality.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import TOL, make_inputs, rel_err, tiny_config

from ltx2_tp.layers.windowed_attention import TemporalWindow, temporal_window
from ltx2_tp.memory.plan import ExecutionPlan
from ltx2_tp.models.ltx2.weights import build_model


def reference_visible(frames, hw, k, total, clean=()) -> torch.Tensor:
    """The definition, token by token: a grid query of frame f sees keys of frames within k of f,
    of clean frames and after the grid; a query after the grid sees every key."""
    grid = frames * hw
    vis = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if i >= grid or j >= grid:
                vis[i, j] = True
            else:
                fi, fj = i // hw, j // hw
                vis[i, j] = abs(fi - fj) <= k or fj in clean
    return vis


def masked_dense(q, k, v, visible):
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)


@pytest.mark.parametrize("k,clean,appended,q_chunk", [(1, (), 0, None), (1, (0,), 7, None), (2, (0, 5), 4, 5),
                                                      (0, (), 3, 2)])
def test_window_equals_masked_dense(k, clean, appended, q_chunk):
    frames, hw, b, h, d = 7, 6, 2, 3, 8
    total = frames * hw + appended
    g = torch.Generator().manual_seed(0)
    q, kk, v = (torch.randn(b, total, h, d, generator=g) for _ in range(3))
    w = TemporalWindow(frames, hw, k, total, clean)
    vis = reference_visible(frames, hw, k, total, clean)
    assert torch.equal(w.visible(), vis)
    ref = masked_dense(q, kk, v, vis)
    assert rel_err(w.attention(q, kk, v, q_chunk), ref) <= TOL
    # rows of the sequence given as segments (a chunk of queries, or Ulysses-style pieces)
    rows = [(4, 9), (20, 13), (frames * hw - 2, 2 + appended)]
    sel = torch.cat([torch.arange(s, s + n) for s, n in rows])
    assert rel_err(w.attention(q[:, sel], kk, v, q_chunk, rows=rows), ref[:, sel]) <= TOL


def test_window_covering_all_frames_is_exact_attention():
    from ltx2_tp.layers.attention_backend import local_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 30, 2, 8, generator=g) for _ in range(3))
    w = TemporalWindow(5, 6, 4, 30)
    assert w.exact and torch.equal(w.attention(q, k, v), local_attention(q, k, v, None))


def test_window_read_from_positions():
    """ltx-core's own positions (causal first frame, bf16) with keyframe tokens appended after the
    grid, and an image-conditioned first frame (timestep 0)."""
    from ltx_core.components.patchifiers import VideoLatentPatchifier
    from ltx_core.tools import VideoLatentTools
    from ltx_core.types import VideoLatentShape

    tools = VideoLatentTools(VideoLatentPatchifier(patch_size=1), VideoLatentShape(1, 16, 5, 3, 4), 24.0)
    pos = tools.create_initial_state("cpu", torch.bfloat16).positions  # (1, 3, 60, 2)
    appended = pos[:, :, 2 * 12 : 3 * 12]  # a keyframe appended for latent frame 2
    pos = torch.cat([pos, appended], dim=2)
    ts = torch.full((2, 72), 0.7)
    ts[:, :12] = 0.0
    w = temporal_window(pos, ts, 1)
    assert (w.frames, w.tokens_per_frame, w.total, w.clean_frames) == (5, 12, 72, (0,))
    assert w.key_ranges(3) == ((0, 12), (24, 72))  # frame 0 (clean), frames 2-4, the appended frame
    assert w.key_ranges(None) == ((0, 72),)
    assert temporal_window(pos[:, :, :60], ts[:1, :1], 2).clean_frames == ()  # one timestep: no clean frames


def window_model_case():
    cfg = tiny_config(apply_gated_attention=True)
    v, a = make_inputs(cfg, batch=2, frames=5, h=2, w=3, audio_tokens=9)  # frame 0 at timestep 0: clean
    return cfg, v, a


def test_model_window_equals_model_masked_to_window():
    cfg, v, a = window_model_case()
    model = build_model(cfg, dtype=torch.float32, seed=3)
    w = temporal_window(v.positions, v.timesteps, 1)
    assert (w.frames, w.tokens_per_frame, w.clean_frames) == (5, 6, (0,))
    masked = dataclasses.replace(v, attention_mask=w.visible().float()[None].repeat(2, 1, 1))
    rv, ra = model(masked, a)
    for plan in (ExecutionPlan(attention_window_frames=1),
                 ExecutionPlan(ffn_chunk_tokens=7, attn_chunk_tokens=4, cache_rope=False, attention_window_frames=1)):
        ov, oa = model(v, a, plan=plan)
        assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL
    ev, _ = model(v, a)  # and it is an approximation: exact attention differs
    assert rel_err(ev, rv) > 1e-3


def test_model_window_covering_all_frames_is_bit_identical():
    cfg, v, a = window_model_case()
    model = build_model(cfg, dtype=torch.float32, seed=3)
    ev, ea = model(v, a)
    ov, oa = model(v, a, plan=ExecutionPlan(attention_window_frames=4))
    assert torch.equal(ov, ev) and torch.equal(oa, ea)


def test_window_refused_with_kv_offload():
    with pytest.raises(ValueError, match="attention-window-frames is not supported with K/V offload"):
        ExecutionPlan(attn_chunk_tokens=4, kv_offload=True, attention_window_frames=1)
