"""Decode and write (pipelines/decode.py, media_stream.py, yuv.py) on the tiny model: the same
frames and audio as the old path (stages.decode_video + decode_audio + media.write_media), exact
counts, interleaved audio, and no partial file or thread left when either side fails."""

from __future__ import annotations

import threading

import av
import numpy as np
import pytest
import torch

from ltx2_tp.compat import ensure_ltx_imports
from ltx2_tp.media import write_media
from ltx2_tp.media_stream import EncoderOptions, StreamingMP4Writer
from ltx2_tp.pipelines import decode, stages
from ltx2_tp.pipelines.tiny import build_tiny_components
from ltx2_tp.yuv import rgb_to_i420

ensure_ltx_imports()

from ltx_core.types import Audio, AudioLatentShape, VideoPixelShape  # noqa: E402


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def latents(frames, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 16, (frames - 1) // 8 + 1, height // 32, width // 32, generator=g)
    shape = VideoPixelShape(batch=1, frames=frames, width=width, height=height, fps=24.0)
    a = AudioLatentShape.from_video_pixel_shape(shape, channels=1, mel_bins=16)
    return video, torch.randn(a.batch, a.channels, a.frames, a.mel_bins, generator=g)


def read(path):
    with av.open(str(path)) as f:
        video = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    with av.open(str(path)) as f:
        audio = [fr.to_ndarray() for fr in f.decode(audio=0)] if f.streams.audio else []
    return video, (np.concatenate(audio, 1) if audio else None)


def our_threads():
    return [t for t in threading.enumerate() if t.name.startswith("ltx2_tp-")]


def old_path(c, video, audio, tile, path):
    frames, chunks = stages.decode_video(c, video, tile, None)
    wav = stages.decode_audio(c, audio)
    write_media(frames, chunks, 24.0, wav, path, "mp4")
    return wav


@pytest.mark.parametrize("frames,h,w,tile,concurrent,convert_threads", [
    (9, 64, 96, None, False, 0),  # the two-stage pipeline's case: whole video, audio first
    (25, 64, 64, 16, True, 2),  # tiles (chunks of 0, 8, 17 frames), audio thread, swscale pool
])
def test_same_frames_and_audio_as_old_path(comps, tmp_path, frames, h, w, tile, concurrent, convert_threads):
    video, audio = latents(frames, h, w)
    wav = old_path(comps, video, audio, tile, tmp_path / "old.mp4")
    timer = stages.StageTimer()
    with timer("decode_and_write"):
        path, samples = decode.decode_and_write(comps, video, audio, 24.0, tmp_path / "new.mp4", "mp4", None, tile,
                                                EncoderOptions(convert_threads=convert_threads), timer,
                                                concurrent_audio=concurrent)
    (v0, a0), (v1, a1) = read(tmp_path / "old.mp4"), read(path)
    assert v1.shape == (frames, h, w, 3) and np.array_equal(v0, v1)  # bit-identical frames
    assert samples == wav.waveform.shape[-1] and a1.shape == a0.shape and np.array_equal(a0, a1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.mp4", "old.mp4"] and not our_threads()
    assert {"decode_and_write.video_decode", "decode_and_write.audio_decode"} <= set(timer.parts)
    assert "  video_decode" in timer.table()


def test_audio_is_interleaved_with_video(tmp_path):
    """12.5 s: beyond the muxer's 10 s interleaving window, so the order is the writer's doing."""
    n, rate = 300, 24000
    frames = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    wav = torch.linspace(-0.5, 0.5, 2 * n * rate // 24).reshape(2, -1)
    with StreamingMP4Writer(tmp_path / "x.mp4", 32, 32, 24, Audio(wav, rate), options=EncoderOptions(preset="ultrafast")) as w:
        for i in range(0, n, 8):
            w.put(frames[i:i + 8])
        w.finish()
    last = {}
    worst = 0.0
    with av.open(str(tmp_path / "x.mp4")) as f:
        for pkt in f.demux():
            if pkt.dts is not None:
                last[pkt.stream.type] = float(pkt.dts * pkt.time_base)
                if len(last) == 2:
                    worst = max(worst, abs(last["video"] - last["audio"]))
    assert 0 < worst < 1.0
    v, a = read(tmp_path / "x.mp4")
    assert v.shape[0] == n and a.shape[1] >= wav.shape[1]


def test_video_is_encoded_while_the_audio_decodes(tmp_path):
    """The encoder thread does not wait for the vocoder: every frame goes through x264 before the
    audio exists, and the file is byte for byte the one written with the audio known from the start."""
    import time
    from concurrent.futures import Future

    n, rate = 48, 16000
    frames = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    wav = torch.linspace(-0.5, 0.5, 2 * n * rate // 24).reshape(2, -1)
    late = Future()
    opts = EncoderOptions(preset="ultrafast")
    with StreamingMP4Writer(tmp_path / "late.mp4", 32, 32, 24, late, audio_rate=rate, options=opts) as w:
        for i in range(0, n, 8):
            w.put(frames[i:i + 8])
        deadline = time.monotonic() + 60
        while w.frames < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.frames == n and not late.done()
        late.set_result(Audio(wav, rate))
        w.finish()
    with StreamingMP4Writer(tmp_path / "early.mp4", 32, 32, 24, Audio(wav, rate), options=opts) as w:
        for i in range(0, n, 8):
            w.put(frames[i:i + 8])
        w.finish()
    assert (tmp_path / "late.mp4").read_bytes() == (tmp_path / "early.mp4").read_bytes()


def test_encoder_failure_leaves_no_file_and_no_thread(tmp_path):
    def boom():
        raise RuntimeError("copy failed")

    w = StreamingMP4Writer(tmp_path / "x.mp4", 32, 32, 24)
    with pytest.raises(RuntimeError, match="copy failed"):
        with w:
            w.put(np.zeros((4, 32, 32, 3), np.uint8), boom)
            for _ in range(100):  # the failure reaches the producer at its next put / finish
                w.put(np.zeros((4, 32, 32, 3), np.uint8))
            w.finish()
    assert list(tmp_path.iterdir()) == [] and not our_threads()
    w = StreamingMP4Writer(tmp_path / "y.mp4", 32, 32, 24)
    with pytest.raises(ValueError):  # PyAV refuses a frame of the wrong size, in the encoder thread
        with w:
            w.put(np.zeros((2, 16, 16, 3), np.uint8))
            w.finish()
    assert list(tmp_path.iterdir()) == [] and not our_threads()


@pytest.mark.parametrize("side", ["video", "audio"])
def test_decoder_failure_leaves_no_file_and_no_thread(comps, tmp_path, monkeypatch, side):
    video, audio = latents(25, 64, 64)
    if side == "video":
        real = stages.decode_video

        def failing(*a, **k):
            frames, n = real(*a, **k)

            def gen():
                yield next(frames)
                yield next(frames)  # 8 frames reach the encoder
                raise RuntimeError("VAE failed")
            return gen(), n
        monkeypatch.setattr(stages, "decode_video", failing)
    else:
        monkeypatch.setattr(stages, "decode_audio", lambda *a: (_ for _ in ()).throw(RuntimeError("vocoder failed")))
    with pytest.raises(RuntimeError, match="VAE failed" if side == "video" else "vocoder failed"):
        decode.decode_and_write(comps, video, audio, 24.0, tmp_path / "x.mp4", "mp4", None, 16, concurrent_audio=True)
    assert list(tmp_path.iterdir()) == [] and not our_threads()


def test_tile_plan_from_memory():
    import sys
    from pathlib import Path

    from ltx_core.model.video_vae import VideoDecoderConfigurator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
    from bench_request import REAL_VAE  # the released LTX-2 VAE's config

    with torch.device("meta"):
        dec = VideoDecoderConfigurator.from_config(REAL_VAE)
    gib = 2**30
    # bf16: 8 copies of 128 channels x (H/4)(W/4) x 2 bytes (16 bytes per output pixel), + 15 B/pixel output
    assert decode.decoder_bytes(dec, 121, 512, 768, torch.bfloat16) == 8 * 128 * 121 * 128 * 192 * 2 + 121 * 512 * 768 * 15
    assert decode.plan_temporal_tile(dec, (1, 128, 16, 16, 24), torch.bfloat16, 40 * gib) is None  # 768x512x121: 7 GiB
    tile = decode.plan_temporal_tile(dec, (1, 128, 121, 34, 60), torch.bfloat16, 40 * gib)  # 1920x1088x961
    assert tile == 112 and decode.decoder_bytes(dec, tile, 1088, 1920, torch.bfloat16) <= 0.8 * 40 * gib
    assert decode.plan_temporal_tile(dec, (1, 128, 121, 34, 60), torch.bfloat16, 1 * gib) == 16  # the floor


def test_gpu_conversion_matches_swscale_within_one_level(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    ours = rgb_to_i420(torch.from_numpy(rgb)).numpy().astype(int)
    ref = np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray() for f in rgb])
    diff = np.abs(ours - ref)
    assert diff[:, :64].max() == 0  # luma: swscale's integer formula
    assert diff[:, 64:].max() == 1 and (diff[:, 64:] > 0).mean() < 0.1  # chroma: its rounding differs


def test_gpu_conversion_path_writes_close_frames(comps, tmp_path):
    video, audio = latents(9, 64, 96)
    old_path(comps, video, audio, None, tmp_path / "old.mp4")
    decode.decode_and_write(comps, video, audio, 24.0, tmp_path / "new.mp4", "mp4",
                            options=EncoderOptions(convert="gpu"))
    (v0, a0), (v1, a1) = read(tmp_path / "old.mp4"), read(tmp_path / "new.mp4")
    mse = np.mean((v0.astype(float) - v1) ** 2)
    assert v1.shape == v0.shape and 10 * np.log10(255**2 / mse) > 35 and np.array_equal(a0, a1)


def test_encoder_options_are_checked():
    with pytest.raises(ValueError, match="preset"):
        EncoderOptions(preset="warp")
    with pytest.raises(ValueError, match="crf"):
        EncoderOptions(crf=60)
    assert EncoderOptions(preset="veryfast", crf=18).codec_options() == {"preset": "veryfast", "crf": "18"}
    assert EncoderOptions().codec_options() == {}  # PyAV's defaults: what ltx-pipelines writes


def test_encoder_options_reach_x264(tmp_path):
    """x264 writes its settings into the stream (an SEI): the preset is the one asked for."""
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for name, opts, mark in (("d.mp4", EncoderOptions(), b"subme=7"),  # medium, CRF 23: today's
                             ("u.mp4", EncoderOptions(preset="ultrafast", crf=30, frame_threads=True), b"subme=0")):
        with StreamingMP4Writer(tmp_path / name, 32, 32, 24, options=opts) as w:
            w.put(frames)
            w.finish()
        data = (tmp_path / name).read_bytes()
        assert mark in data and (b"crf=30.0" in data) == (opts.crf == 30)


def test_cli_decode_mode():
    from ltx2_tp.cli import _decode_settings, build_parser
    from ltx2_tp.media_stream import EXACT_OPTIONS, FAST_OPTIONS

    parse = lambda *a: build_parser().parse_args(["generate", "--prompt", "x", *a])  # noqa: E731
    assert _decode_settings(parse()) == (True, FAST_OPTIONS)
    assert _decode_settings(parse("--decode-mode", "exact")) == (False, EXACT_OPTIONS) == (False, EncoderOptions())
    assert _decode_settings(parse("--no-video-encoder-frame-threads", "--video-encoder-crf", "18")) == (
        True, EncoderOptions(preset="ultrafast", crf=18, frame_threads=False, convert="gpu"))
    assert _decode_settings(parse("--decode-mode", "exact", "--video-convert", "gpu"))[1] == EncoderOptions(convert="gpu")


def test_cli_encoder_flags():
    import subprocess
    import sys

    from ltx2_tp.cli import _encoder_options, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--video-encoder-preset", "veryfast",
                                      "--video-encoder-crf", "20", "--video-convert", "gpu"])
    assert _encoder_options(args) == EncoderOptions(preset="veryfast", crf=20, convert="gpu")
    r = subprocess.run([sys.executable, "-m", "ltx2_tp.cli", "generate", "--prompt", "x", "--video-encoder-crf", "60"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--video-encoder-*: video encoder crf must be between 0 and 51" in r.stderr
