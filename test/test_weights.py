"""Checkpoint loading: official keys from safetensors, ComfyUI prefix, one error listing all mismatches."""

from __future__ import annotations

import pytest
import torch
from reference import TOL, make_inputs, rel_err, tiny_config

from ltx2_tp.models.ltx2.config import LTX2Config, get_config
from ltx2_tp.models.ltx2.weights import (CheckpointMismatchError, build_model, checkpoint_spec, load_weights,
                                         official_state_dict, read_checkpoint_config, save_checkpoint)


def _official_sd(cfg, seed=0):
    """The state dict a checkpoint of this config holds (official keys), via our seeded init."""
    m = build_model(cfg, dtype=torch.float32, seed=seed)
    return official_state_dict(m), m


def test_official_keys_include_unfused_qkv():
    cfg = tiny_config()
    keys = set(checkpoint_spec(build_model(cfg, dtype=torch.float32)))
    for k in ("transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn1.to_v.bias",
              "transformer_blocks.1.ff.net.0.proj.weight", "transformer_blocks.1.ff.net.2.weight",
              "transformer_blocks.0.video_to_audio_attn.to_out.0.weight", "adaln_single.emb.timestep_embedder.linear_1.weight",
              "av_ca_a2v_gate_adaln_single.linear.bias", "caption_projection.linear_2.weight",
              "transformer_blocks.0.scale_shift_table_a2v_ca_audio", "audio_proj_out.weight"):
        assert k in keys, k
    assert not any("to_qkv" in k or "to_kv" in k for k in keys)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_safetensors_roundtrip(tmp_path, prefix):
    cfg = tiny_config(rope_type="split", double_precision_rope=True)
    sd, src = _official_sd(cfg, seed=5)
    path = tmp_path / "transformer.safetensors"
    save_checkpoint(sd, path, config={"transformer": {"rope_type": "split", "frequencies_precision": "float64"}},
                    prefix=prefix)
    conf = LTX2Config.from_checkpoint_config(read_checkpoint_config([str(path)]), base=cfg.replace(rope_type="interleaved"))
    assert conf.rope_type == "split" and conf.double_precision_rope
    loaded = build_model(conf, dtype=torch.float32, files=[str(path)])
    v, a = make_inputs(cfg)
    ov, oa = loaded(v, a)
    rv, ra = src(v, a)
    assert rel_err(ov, rv) <= TOL and rel_err(oa, ra) <= TOL


def test_mismatch_lists_everything_once():
    cfg = tiny_config()
    sd, _ = _official_sd(cfg)
    sd.pop("transformer_blocks.0.attn1.to_k.weight")
    sd.pop("proj_out.bias")
    sd["transformer_blocks.0.bogus.weight"] = torch.zeros(3)
    sd["transformer_blocks.1.ff.net.2.weight"] = torch.zeros(5, 5)
    model = build_model(cfg, dtype=torch.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(model, state_dict=sd)
    msg = str(e.value)
    for s in ("missing (2)", "attn1.to_k.weight", "proj_out.bias", "unexpected (1)", "bogus",
              "wrong shape (1)", "ff.net.2.weight: checkpoint (5, 5)"):
        assert s in msg, s


def test_config_mismatch_is_reported_as_shapes():
    sd, _ = _official_sd(tiny_config())
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_weights(build_model(tiny_config(attention_head_dim=16), dtype=torch.float32), state_dict=sd)


def test_meta_construction_allocates_only_target():
    m = build_model(get_config("tiny"), dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in m.parameters())


def test_presets_and_parallel_validation():
    c = get_config("ltx-2-19b")
    assert c.inner_dim == 4096 and c.audio_inner_dim == 2048 and c.num_layers == 48 and c.rope_type == "split"
    assert get_config("ltx-2.3").cross_attention_adaln and not get_config("ltx-2.3").caption_projection
    assert not get_config("ltx-2.5").ff_bias
    with pytest.raises(ValueError, match="tp_size=3 must divide num_attention_heads=32"):
        c.validate_parallel(3)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("nope")
