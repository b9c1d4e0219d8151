"""Rows that equal another row until some block (the STG pass = the cond pass until its first STG
block) run only from that block on (inputs.Perturbations.same_inputs_as / SharedPrefix), rows with
equal inputs compute their text K/V once (distinct_contexts), and the forward equals the one that
runs every row through every block."""

from __future__ import annotations

import pytest
import torch
from reference import TOL, make_inputs, rel_err, tiny_config

from ltx2_tp.models.ltx2.inputs import (SKIP_A2V, SKIP_AUDIO_SELF_ATTN, SKIP_V2A, SKIP_VIDEO_SELF_ATTN,
                                        Perturbations, select_rows)
from ltx2_tp.models.ltx2.weights import build_model

COND, UNCOND = [], []
STG = [(SKIP_VIDEO_SELF_ATTN, [2]), (SKIP_AUDIO_SELF_ATTN, [2])]
ISOLATED = [(SKIP_A2V, None), (SKIP_V2A, None)]


def _guidance_batch(cfg):
    """cond / uncond / perturbed / isolated rows as guidance.run_passes stacks them: one latent,
    the negative context in row 1 only."""
    v, a = make_inputs(cfg, batch=2, frames=3, h=2, w=3)
    rows = [0, 1, 0, 0]  # row 1 stands for the negative prompt (other context and mask)
    return select_rows(v, rows), select_rows(a, rows)


def test_shared_prefix_schedule():
    p = Perturbations([COND, UNCOND, STG, ISOLATED], same_inputs_as=(None, None, 0, 0))
    s = p.shared_prefix(4)
    # the STG row forks at block 2; the isolated row differs from block 0, so it is a leader
    assert (s.fork, s.leaders, s.index) == (2, [0, 1, 3], [0, 1, 0, 2])
    assert Perturbations([COND, ISOLATED], same_inputs_as=(None, 0)).shared_prefix(4) is None
    assert Perturbations([COND, STG]).shared_prefix(4) is None  # no word from the caller: nothing shared
    same = Perturbations([COND, COND], same_inputs_as=(None, 0)).shared_prefix(4)
    assert (same.fork, same.leaders, same.index) == (4, [0], [0, 0])  # a duplicate row runs no block
    with pytest.raises(ValueError, match="earlier row"):
        Perturbations([COND, COND], same_inputs_as=(1, None)).shared_prefix(4)
    # text contexts: rows 0, 2, 3 share one (computed at position 0), row 1 has its own
    assert p.distinct_contexts([0, 1, 2, 3]) == ([0, 1], [0, 1, 0, 0])
    assert p.distinct_contexts([0, 1, 3]) == ([0, 1], [0, 1, 0])  # the leaders of the shared prefix
    assert p.distinct_contexts([0, 1]) is None


@pytest.mark.parametrize("stg_block,adaln", [(0, False), (2, False), (3, False), (2, True)])
def test_shared_prefix_equals_every_row_every_block(stg_block, adaln):
    cfg = tiny_config(num_layers=4, cross_attention_adaln=adaln)  # adaln: LTX-2.3's prompt-modulated text
    model = build_model(cfg, dtype=torch.float32, seed=5)
    v, a = _guidance_batch(cfg)
    stg = [(SKIP_VIDEO_SELF_ATTN, [stg_block]), (SKIP_AUDIO_SELF_ATTN, [stg_block])]
    rows = [COND, UNCOND, stg, ISOLATED]
    ref = model(v, a, perturbations=Perturbations(rows))
    calls, kv_rows = [], set()
    for blk in model.transformer_blocks:
        blk.register_forward_pre_hook(lambda m, args: calls.append((m.idx, args[0].x.shape[0])))
        for attn in (blk.attn2, blk.audio_attn2):
            attn.to_kv.register_forward_pre_hook(lambda m, args: kv_rows.add(args[0].shape[0]))
    out = model(v, a, perturbations=Perturbations(rows, same_inputs_as=(None, None, 0, 0)))
    assert rel_err(out[0], ref[0]) <= TOL and rel_err(out[1], ref[1]) <= TOL
    assert kv_rows == {2}  # text K/V for the 2 distinct contexts, not for 3 or 4 rows
    # blocks before the STG block ran 3 rows, the rest 4: 12 + 4 * stg_block row-blocks of 16
    assert calls == [(i, 3 if i < stg_block else 4) for i in range(4)]
