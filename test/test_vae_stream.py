"""The streamed video VAE decode (models/vae_stream.py) equals ltx-core's whole-video decode on
decoders shaped like LTX-2's (residual compress_all) and LTX-2.3's (compress_space / compress_time,
timestep conditioning with its noise), non-causal and causal, cut into pieces down to one frame;
decoders it cannot stream exactly are refused and fall back to ltx-core's tiles."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltx2_tp.compat import ensure_ltx_imports
from ltx2_tp.models import vae_stream
from ltx2_tp.pipelines import decode, stages
from ltx2_tp.pipelines.tiny import TINY_VAE, build_tiny_components, neutral_latent_statistics

ensure_ltx_imports()

from ltx_core.model.video_vae import VideoDecoderConfigurator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
from bench_request import REAL_VAE  # noqa: E402  (the released LTX-2 VAE's config)

TOL = 1e-5


def _small(cfg, **kw):
    cfg = copy.deepcopy(cfg)
    cfg["vae"].update({"latent_channels": 16, "decoder_base_channels": 8, **kw})
    return cfg


LTX2 = _small(REAL_VAE)  # compress_all with residual, x3 (res_x of 1 layer here, 5 in the release)
for _block in LTX2["vae"]["decoder_blocks"]:
    if _block[0] == "res_x":
        _block[1] = {"num_layers": 1}
LTX23 = _small({"vae": {"patch_size": 4, "decoder_blocks": [
    ["res_x", {"num_layers": 1}], ["compress_space", {"multiplier": 2}], ["res_x", {"num_layers": 1}],
    ["compress_time", {"multiplier": 2}], ["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 1}],
    ["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 2}], ["res_x", {"num_layers": 1}]]}},
    timestep_conditioning=True)


def build(cfg, causal=False):
    torch.manual_seed(0)
    dec = VideoDecoderConfigurator.from_config(_small(cfg, causal_decoder=causal)).eval()
    neutral_latent_statistics([dec])
    with torch.no_grad():
        for p in dec.parameters():
            if p.ndim <= 2:  # timestep tables and embedders: ltx-core leaves them empty / zero
                p.normal_(0, 0.1)
    return dec


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cfg,causal", [(TINY_VAE, False), (LTX2, False), (LTX23, False), (LTX2, True)],
                         ids=["tiny", "ltx2", "ltx2.3-timestep", "ltx2-causal"])
def test_pieces_equal_the_whole_decode(cfg, causal):
    dec = build(cfg, causal)
    assert vae_stream.unsupported(dec) is None
    for latent_frames, chunks in ((1, (1,)), (5, (1, 8))):
        lat = torch.randn(1, 16, latent_frames, 2, 2, generator=torch.Generator().manual_seed(latent_frames))
        with torch.no_grad():
            ref = dec(lat, generator=torch.Generator().manual_seed(1))
        for chunk in chunks:  # chunk 1: one frame per piece at every stage
            pieces = list(vae_stream.stream_decode(dec, lat, chunk, torch.Generator().manual_seed(1), min_voxels=1))
            out = torch.cat(pieces, 2)
            assert out.shape == ref.shape and rel(out, ref) <= TOL, (latent_frames, chunk, rel(out, ref))
            if latent_frames > 1:  # 33 frames come out in pieces of about `chunk`
                assert len(pieces) > 2 and max(p.shape[2] for p in pieces[1:-1]) <= max(chunk, 2)


def test_piece_sizes_follow_the_stage_and_the_memory():
    with torch.device("meta"):
        dec = VideoDecoderConfigurator.from_config(REAL_VAE)
    lat = torch.empty(1, 128, 16, 16, 24, device="meta")
    stages_ = vae_stream._stages(dec, lat, None)
    sizes = [vae_stream.piece_frames(s, stages_[-1].t_scale, 16) for s in stages_]
    # 768x512: conv_in / latent-level blocks (16x24 per frame) take >= 32k voxels: the whole video;
    # then 64x96 frames in 8-frame pieces, 128x192 frames in 16-frame pieces
    assert [(s.t_scale, s.h) for s in stages_] == [(1, 16), (1, 16), (1, 16), (2, 32), (2, 32), (4, 64), (4, 64),
                                                   (8, 128), (8, 128)]
    assert sizes == [86, 86, 86, 22, 22, 8, 8, 16, 16]
    gib = 2**30
    assert decode.plan_stream_chunk(dec, (1, 128, 121, 34, 60), torch.bfloat16, 40 * gib) == 16  # 1920x1088x961
    assert decode.plan_stream_chunk(dec, (1, 128, 121, 34, 60), torch.bfloat16, int(6.5 * gib)) == 7  # a 24 GiB cap's
    assert decode.plan_stream_chunk(dec, (1, 128, 121, 34, 60), torch.bfloat16, 1 * gib) == 1
    assert decode.plan_stream_chunk(dec, (1, 128, 121, 34, 60), torch.bfloat16, 0) == 1


def test_decoders_it_cannot_stream_fall_back_to_tiles():
    group, shortcut = build(TINY_VAE), build(TINY_VAE)
    block = group.up_blocks[0].res_blocks[0]
    block.norm1 = torch.nn.GroupNorm(1, block.in_channels)  # norm_layer="group_norm": statistics over all frames
    assert "GroupNorm" in vae_stream.unsupported(group)
    block = shortcut.up_blocks[0].res_blocks[0]
    block.norm3 = torch.nn.GroupNorm(1, block.in_channels)  # what res_x_y blocks have
    assert "GroupNorm shortcut" in vae_stream.unsupported(shortcut)
    bare = build(TINY_VAE)
    bare.up_blocks[0].res_blocks[0].conv1 = torch.nn.Conv3d(block.in_channels, block.in_channels, 3, padding=1)
    assert "not a CausalConv3d" in vae_stream.unsupported(bare)  # a plain Conv3d would need its own frame state
    with pytest.raises(ValueError, match="cannot be streamed"):
        next(vae_stream.stream_decode(group, torch.randn(1, 16, 2, 2, 2)))
    c = type("C", (), {"video_decoder": group})()
    assert decode.resolve_tile(c, torch.randn(1, 16, 2, 2, 2), decode.STREAM) is None  # AUTO: fits, whole video
    assert decode.resolve_tile(c, torch.randn(1, 16, 2, 2, 2), 16) == 16


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def test_stream_through_decode_and_write(comps, tmp_path, monkeypatch):
    """The uint8 frames of the streamed decode against ltx-core's (float rounding may move a value
    across a level boundary), and the whole stage with the fast settings."""
    from ltx2_tp.media_stream import EXACT_OPTIONS, FAST_OPTIONS
    from test_decode import latents, old_path, read  # noqa: PLC0415

    monkeypatch.setattr(vae_stream, "MIN_PIECE_VOXELS", 1)  # pieces at this size too

    video, audio = latents(33, 64, 96)
    whole = next(stages.decode_video(comps, video, None)[0])
    frames, n = stages.decode_video(comps, video, vae_stream.Streamed(8))
    pieces = list(frames)
    streamed = torch.cat(pieces)
    diff = (streamed.int() - whole.int()).abs()
    assert len(pieces) > 1 and streamed.shape == whole.shape == (33, 64, 96, 3)
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    old_path(comps, video, audio, None, tmp_path / "old.mp4")
    for name, options in (("exact.mp4", EXACT_OPTIONS), ("fast.mp4", FAST_OPTIONS)):
        timer = stages.StageTimer()
        decode.decode_and_write(comps, video, audio, 24.0, tmp_path / name, options=options, timer=timer,
                                tile_frames=decode.STREAM)
        assert "decode_and_write.video_decode" in timer.parts
    (v0, a0), (v1, a1), (v2, a2) = (read(tmp_path / n) for n in ("old.mp4", "exact.mp4", "fast.mp4"))
    mse = np.mean((v0.astype(float) - v1) ** 2)  # x264 medium on (nearly) the same frames
    assert v1.shape == v2.shape == v0.shape and 10 * np.log10(255**2 / mse) > 35
    assert np.array_equal(a0, a1) and np.array_equal(a0, a2)
    assert b"subme=0" in (tmp_path / "fast.mp4").read_bytes()  # x264's ultrafast
