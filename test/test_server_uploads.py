"""Retake, A2Vid and IC-LoRA through POST /v1/videos: their inputs uploaded as multipart files
(video_reference, audio_path, video_conditioning), an IC-LoRA named from the server's own
(`serve --ic-lora NAME=PATH`). Each job's MP4 is byte-identical to what `ltx2-tp generate
--pipeline-class-name X` writes from the same files and seed (same latents, same encoder settings);
bad uploads are 400 / 413 naming the field, with nothing left on disk; a restarted server runs a
queued retake with its upload; an IC-LoRA job leaves the shared transformer's weights as they were.

torchaudio cannot be installed beside torch 2.13: the retake of a video with sound and A2Vid encode
audio with ltx-core's encoder, which runs here with test/official.py's torch-only mel spectrogram in
torchaudio's place, for the server and for `generate` alike (16 kHz audio: no resampling).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
import official  # noqa: E402

from ltx2_tp.pipelines.request import GenerationRequest  # noqa: E402
from ltx2_tp.pipelines.tiny import build_tiny_components  # noqa: E402
from ltx2_tp.serving.api import create_app  # noqa: E402
from ltx2_tp.serving.ic_loras import ICLoras  # noqa: E402
from ltx2_tp.serving.job import Job, new_job_id  # noqa: E402
from ltx2_tp.serving.jobs import JobManager  # noqa: E402
from ltx2_tp.serving.pipelines import ServedPipelines  # noqa: E402
from ltx2_tp.serving.sqlite_store import SQLiteJobStore  # noqa: E402
from server_utils import wait_done  # noqa: E402

SIZE = {"width": "128", "height": "128", "num_frames": "9"}
SEED = "3"


@pytest.fixture(scope="module", autouse=True)
def mel():
    """ltx-core's audio encoder with a torch-only mel spectrogram (module docstring)."""
    with official.mel_spectrogram_stand_in():
        yield


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(0)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 64x64 source video with 16 kHz stereo audio (9 frames at 24 fps), a reference video without
    sound, 1 s of 16 kHz stereo audio (WAV: the tiny audio encoder takes 2 channels), an image, two IC-LoRA files for the tiny DiT (one
    with reference_downscale_factor 2)."""
    import av
    from ltx_core.types import Audio
    from ltx_pipelines.utils.media_io import encode_video
    from PIL import Image
    from safetensors.torch import save_file

    from ltx2_tp.models.ltx2.weights import official_state_dict

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    out = {}
    t = torch.arange(16000 * 9 // 24) / 16000
    wave = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 660 * t)]) * 0.5
    for name, audio in (("source", Audio(waveform=wave, sampling_rate=16000)), ("reference", None)):
        frames = torch.from_numpy((rng.random((9, 64, 64, 3)) * 255).astype(np.uint8))
        out[name] = d / f"{name}.mp4"
        encode_video(iter([frames]), 24, audio, str(out[name]), 1)
    out["speech"] = d / "speech.wav"
    with av.open(str(out["speech"]), "w") as f:
        s = f.add_stream("pcm_s16le", rate=16000, layout="stereo")
        t1 = np.arange(16000) / 16000
        chirp = (np.sin(2 * np.pi * 220 * t1 * (1 + t1)) * 2**14).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([chirp, chirp[::-1]]).T.reshape(1, -1).copy(), format="s16",
                                           layout="stereo")
        frame.sample_rate = 16000
        for packet in (*s.encode(frame), *s.encode(None)):
            f.mux(packet)
    out["image"] = d / "first.png"
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(out["image"])
    sd = official_state_dict(build_tiny_components(0).transformer)
    for name, seed, factor in (("depth", 1, "2"), ("pose", 2, "1")):
        g = torch.Generator().manual_seed(seed)
        pairs = {}
        for k, v in sd.items():
            if v.ndim == 2 and k.startswith("transformer_blocks.") and k.endswith(".weight"):
                base = "diffusion_model." + k[: -len(".weight")]
                pairs[base + ".lora_A.weight"] = torch.randn(2, v.shape[1], generator=g) * 0.1
                pairs[base + ".lora_B.weight"] = torch.randn(v.shape[0], 2, generator=g) * 0.1
        out[name] = d / f"{name}-ic-lora.safetensors"
        save_file(pairs, str(out[name]), metadata={"reference_downscale_factor": factor})
    return out


def _served(components, out, media, **kw):
    ic = ICLoras.parse([f"depth={media['depth']}", f"pose={media['pose']}"])
    pipes = ServedPipelines(components, "LTX2LongVideo", "ltx-2-tiny", ic_loras=ic)
    manager = JobManager(pipes, out, max_queue=8, idle_poll_s=0.05)
    app = create_app(manager, model_name="ltx-2-tiny", pipelines=pipes, max_video_tokens=5000, **kw)
    return manager, app


@pytest.fixture(scope="module")
def server(tmp_path_factory, components, media):
    out = tmp_path_factory.mktemp("server")
    manager, app = _served(components, out, media)
    with TestClient(app) as http:
        yield http, manager, out
    manager.close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """flags -> the MP4 bytes `ltx2-tp generate` writes with them (in process: the CLI's main)."""
    from ltx2_tp.cli import main

    out, cache = tmp_path_factory.mktemp("generate"), {}

    def get(*flags: str) -> bytes:
        if flags not in cache:
            path = out / f"{len(cache)}.mp4"
            assert main(["generate", "--prompt", "a fox", "--seed", SEED, *flags, "--output-path", str(path)]) == 0
            cache[flags] = path.read_bytes()
        return cache[flags]

    return get


def _files(**uploads):
    """multipart file parts: field -> path or [paths] (or (name, bytes, type))."""
    parts = []
    for field, value in uploads.items():
        for v in value if isinstance(value, list) else [value]:
            parts.append((field, v if isinstance(v, tuple) else (Path(v).name, Path(v).read_bytes(), "video/mp4")))
    return parts


def _post(http, files, **fields):
    return http.post("/v1/videos", data={"prompt": "a fox", "seed": SEED, **fields}, files=files)


def _video(server, files, **fields) -> bytes:
    http, manager, out = server
    r = _post(http, files, **fields)
    assert r.status_code == 200, r.json()
    job = wait_done(manager, r.json()["id"])
    assert job.status == "completed", job.error
    assert sorted(p.name for p in (out / job.id).iterdir()) == ["thumbnail.png", "video.mp4"]  # the uploads are gone
    return http.get(f"/v1/videos/{job.id}/content").content


# ---- each pipeline equals `ltx2-tp generate` ------------------------------------------------------
def test_retake_equals_generate(server, media, generated):
    video = _video(server, _files(video_reference=media["source"]), model="retake", start_time="0.1", end_time="0.3",
                   num_inference_steps="2")
    assert video == generated("--pipeline-class-name", "LTX2RetakePipeline", "--video-path", str(media["source"]),
                              "--start-time", "0.1", "--end-time", "0.3", "--num-inference-steps", "2")


def test_a2vid_equals_generate(server, media, generated):
    video = _video(server, _files(audio_path=media["speech"]), model="LTX2A2VidPipeline", num_inference_steps="2",
                   audio_start_time="0.25", **SIZE)
    assert video == generated("--pipeline-class-name", "LTX2A2VidPipeline", "--audio-path", str(media["speech"]),
                              "--audio-start-time", "0.25", "--num-inference-steps", "2",
                              *(x for k, v in SIZE.items() for x in (f"--{k.replace('_', '-')}", v)))


def test_ic_lora_equals_generate_and_leaves_the_weights(server, components, media, generated):
    """IC-LoRA `depth` at 0.8 (two references, attention strength 0.5), then the distilled pipeline
    (no LoRA), then `pose`: each video is generate's with the same LoRA, and the shared
    transformer's weights are bit-identical to before afterwards."""
    size = [x for k, v in SIZE.items() for x in (f"--{k.replace('_', '-')}", v)]
    before = {k: v.clone() for k, v in components.transformer.state_dict().items()}
    depth = _video(server, _files(video_conditioning=[media["reference"], media["source"]]), model="ic_lora",
                   ic_lora="depth", ic_lora_strength="0.8", video_conditioning_strength="1.0,0.6",
                   conditioning_attention_strength="0.5", **SIZE)
    distilled = _video(server, [], model="distilled", **SIZE)
    pose = _video(server, _files(video_conditioning=media["reference"]), model="LTX2ICLoraPipeline", ic_lora="pose",
                  **SIZE)
    no_lora = _video(server, _files(video_conditioning=media["reference"]), model="LTX2ICLoraPipeline", **SIZE)
    after = components.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert depth == generated("--pipeline-class-name", "LTX2ICLoraPipeline", "--lora", str(media["depth"]), "0.8",
                              "--video-conditioning", str(media["reference"]), "1.0", "--video-conditioning",
                              str(media["source"]), "0.6", "--conditioning-attention-strength", "0.5", *size)
    assert distilled == generated("--pipeline-class-name", "LTX2DistilledPipeline", *size)
    assert pose == generated("--pipeline-class-name", "LTX2ICLoraPipeline", "--lora", str(media["pose"]),
                             "--video-conditioning", str(media["reference"]), "1.0", *size)
    assert pose != depth and no_lora != pose  # the LoRA is what changes the video
    assert no_lora == generated("--pipeline-class-name", "LTX2ICLoraPipeline", "--video-conditioning",
                                str(media["reference"]), "1.0", *size)


def test_keyframes_take_input_reference(server, media, generated):
    """The keyframe pipeline's frame-0 keyframe from input_reference (the upload is saved before the
    pipeline checks that it has an image: before, the check ran first and refused every request)."""
    image = ("first.png", media["image"].read_bytes(), "image/png")
    video = _video(server, [("input_reference", image)], model="keyframe_interpolation", num_inference_steps="2",
                   **SIZE)
    assert video == generated("--pipeline-class-name", "LTX2KeyframeInterpolationPipeline", "--image-path",
                              str(media["image"]), "--num-inference-steps", "2",
                              *(x for k, v in SIZE.items() for x in (f"--{k.replace('_', '-')}", v)))


def test_models_list_the_three(server):
    ids = {m["id"] for m in server[0].get("/v1/models").json()["data"]}
    assert {"LTX2RetakePipeline", "LTX2A2VidPipeline", "LTX2ICLoraPipeline"} <= ids


# ---- bad uploads ----------------------------------------------------------------------------------
def _mp4_without_audio(media):
    return ("silent.mp4", media["reference"].read_bytes(), "video/mp4")


@pytest.mark.parametrize("case", [
    "not_a_video", "image_as_video", "no_audio_stream", "start_after_clip", "end_after_clip", "audio_start_after",
    "unknown_ic_lora", "strength_without_lora", "not_read", "needs_source", "path_field", "unexpected_file",
    "too_many_references", "strengths_count", "start_not_for_pipeline",
])
def test_bad_uploads_are_400s_naming_the_field(server, media, case):
    http, manager, out = server
    src = _files(video_reference=media["source"])
    cases = {  # case: (files, fields, param, words in the message)
        "not_a_video": ([("video_reference", ("a.mp4", b"not a video at all", "video/mp4"))],
                        dict(model="retake", start_time="0", end_time="0.1"), "video_reference", "video file"),
        "image_as_video": ([("video_reference", ("a.png", media["image"].read_bytes(), "image/png"))],
                           dict(model="retake", start_time="0", end_time="0.1"), "video_reference",
                           "must be a video file"),  # image demuxers are not in media_probe.SAFE_FORMATS
        "no_audio_stream": ([("audio_path", _mp4_without_audio(media))], dict(model="a2vid_two_stage", **SIZE),
                            "audio_path", "no audio stream"),
        "start_after_clip": (src, dict(model="retake", start_time="0.5", end_time="0.6"), "start_time",
                             "between 0 and 0.375 s"),
        "end_after_clip": (src, dict(model="retake", start_time="0.1", end_time="2"), "end_time", "between 0 and 0.375"),
        "audio_start_after": (_files(audio_path=media["source"]), dict(model="a2vid_two_stage", audio_start_time="9",
                                                                      **SIZE), "audio_start_time", "below 0.375"),
        "unknown_ic_lora": (_files(video_conditioning=media["reference"]), dict(model="ic_lora", ic_lora="canny", **SIZE),
                            "ic_lora", "this server has: depth, pose"),
        "strength_without_lora": (_files(video_conditioning=media["reference"]),
                                  dict(model="ic_lora", ic_lora_strength="0.5", **SIZE), "ic_lora_strength", "needs ic_lora"),
        "not_read": (src, dict(model="distilled", **SIZE), "video_reference", "does not read video_reference"),
        "needs_source": ([], dict(model="retake", start_time="0", end_time="0.1"), "video_reference", "needs"),
        "path_field": (src, dict(model="retake", video_path="/etc/passwd"), "video_path", "reads no file paths"),
        "unexpected_file": ([("source", ("a.mp4", b"x", "video/mp4"))], dict(model="retake"), "source",
                            "unexpected file field"),
        "too_many_references": (_files(video_conditioning=[media["reference"]] * 5), dict(model="ic_lora", **SIZE),
                                "video_conditioning", "at most 4"),
        "strengths_count": (_files(video_conditioning=[media["reference"]] * 2),
                            dict(model="ic_lora", video_conditioning_strength="1,0.5,0.2", **SIZE),
                            "video_conditioning_strength", "one per video_conditioning file"),
        "start_not_for_pipeline": ([], dict(model="distilled", start_time="0.1", **SIZE), "start_time", "does not"),
    }
    files, fields, param, says = cases[case]
    before = sorted(p.name for p in out.iterdir())
    r = _post(http, files, **fields)
    body = r.json()
    assert r.status_code == 400 and body["error"]["param"] == param and says in body["error"]["message"], body
    assert sorted(p.name for p in out.iterdir()) == before  # no job directory, no partial file


def test_uploads_over_the_limit_are_413(tmp_path, components, media):
    out = tmp_path / "srv"
    size = media["source"].stat().st_size
    manager, app = _served(components, out, media, max_media_upload_bytes=size + 10)
    try:
        with TestClient(app) as http:
            r = _post(http, _files(video_conditioning=[media["source"], media["source"]]), model="ic_lora", **SIZE)
            assert r.status_code == 413 and r.json()["error"]["param"] == "video_conditioning", r.json()
            big = ("big.mp4", b"\0" * (size + 2**20), "video/mp4")
            r = _post(http, [("video_reference", big)], model="retake")
            assert r.status_code == 413 and "--max-media-upload-bytes" in r.json()["error"]["message"], r.json()
        assert not [p for p in out.iterdir() if p.name.startswith("video_")]  # nothing half-written stays
    finally:
        manager.close()


def test_json_bodies_and_framework_limits(server):
    http = server[0]
    r = http.post("/v1/videos", json={"prompt": "x", "model": "retake", "video_reference": "/etc/passwd"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "video_reference"
    r = http.post("/v1/videos", json={"prompt": "x", "model": "a2vid_two_stage", "audio_path": "/etc/passwd"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio_path"


def test_serve_checks_its_ic_lora_files_before_building(tmp_path, media, capsys):
    from safetensors.torch import save_file

    from ltx2_tp.cli import main

    not_lora = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(not_lora))
    for flags, says in ((["--ic-lora", "depth"], "--ic-lora: expected NAME=PATH"),
                        (["--ic-lora", f"depth={tmp_path / 'nope.safetensors'}"], "depth: no such file"),
                        (["--ic-lora", f"depth={media['depth']}", "--ic-lora", f"depth={media['pose']}"], "given twice"),
                        (["--ic-lora", f"w={not_lora}"], "no lora_A / lora_B weight pairs"),
                        (["--ic-lora", f"x={media['image']}"], "not a safetensors file"),
                        (["--max-media-upload-bytes", "0"], "--max-media-upload-bytes must be at least 1")):
        capsys.readouterr()
        assert main(["serve", "--output-dir", str(tmp_path / "srv"), *flags]) == 2, flags
        assert says in capsys.readouterr().err, flags


# ---- durable: a queued retake survives a restart; deleting removes the uploads -------------------------
def test_restart_runs_a_queued_retake_with_its_upload(tmp_path, components, media, generated):
    out = tmp_path / "srv"
    out.mkdir()
    job_id = new_job_id()
    (out / job_id).mkdir()
    upload = out / job_id / "video_reference.mp4"
    upload.write_bytes(media["source"].read_bytes())
    store = SQLiteJobStore(out)  # what a stopped server left: one queued retake, its upload in its directory
    req = GenerationRequest(prompt="a fox", seed=int(SEED), num_inference_steps=2, pipeline="LTX2RetakePipeline",
                            video_path=str(upload), start_time=0.1, end_time=0.3, width=64, height=64, num_frames=9)
    store.add(Job(id=job_id, request=req, model="retake", seconds="1", size="64x64"), 8)
    store.close()
    m = JobManager(ServedPipelines(components, "LTX2LongVideo", "ltx-2-tiny"), out, idle_poll_s=0.05)
    try:
        assert wait_done(m, job_id).status == "completed", m.get(job_id).error
        assert (out / job_id / "video.mp4").read_bytes() == generated(
            "--pipeline-class-name", "LTX2RetakePipeline", "--video-path", str(media["source"]), "--start-time", "0.1",
            "--end-time", "0.3", "--num-inference-steps", "2")
        assert not upload.exists()  # the upload goes once the job is done
    finally:
        m.close()


def test_delete_removes_a_jobs_uploads(server, media):
    http, manager, out = server
    ids = []
    for _ in range(2):  # the second waits behind the first
        r = _post(http, _files(audio_path=media["source"]), model="a2vid_two_stage", num_inference_steps="1", **SIZE)
        ids.append(r.json()["id"])
    assert any((out / i).is_dir() for i in ids)
    for i in ids:
        assert http.delete(f"/v1/videos/{i}").status_code == 200
    t = time.time()
    while any((out / i).exists() or (out / ".tmp" / i).exists() for i in ids):  # a running one: once it stops
        assert time.time() - t < 60
        time.sleep(0.05)


def test_probing_and_decoding_do_not_block_the_server(server, media, monkeypatch):
    """A slow probe (a large upload) runs in a worker thread: /health answers meanwhile."""
    import threading

    import ltx2_tp.serving.uploads as uploads

    http, manager, _ = server
    real = uploads.probe

    def slow(*a, **k):
        time.sleep(1.5)
        return real(*a, **k)

    monkeypatch.setattr(uploads, "probe", slow)
    done = []
    th = threading.Thread(target=lambda: done.append(_post(http, _files(video_reference=media["source"]), model="retake",
                                                           start_time="0", end_time="9")))
    th.start()
    time.sleep(0.3)
    t = time.time()
    assert http.get("/health").status_code == 200
    assert time.time() - t < 1.0 and not done  # answered while the upload is probed
    th.join()
    assert done[0].status_code == 400 and done[0].json()["error"]["param"] == "end_time"


def test_probe_reads_the_header_and_bounds_the_media(tmp_path, media):
    """Frames and sides from the header (no decode), a WebM's frames counted (its header has no
    count, as ltx-pipelines counts them), audio length; each bound a 400 naming the field."""
    import av

    from ltx2_tp.serving.errors import ApiError
    from ltx2_tp.serving.media_probe import probe

    info = probe(media["source"], "video_reference", "video", max_frames=9)
    assert (info.frames, info.width, info.height, info.fps, info.seconds) == (9, 64, 64, 24.0, 0.375)
    assert 0.3 < info.audio_seconds < 0.5
    webm = tmp_path / "ref.webm"
    with av.open(str(webm), "w") as f:
        s = f.add_stream("libvpx", rate=24)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(9):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in s.encode(frame):
                f.mux(packet)
        for packet in s.encode(None):
            f.mux(packet)
    assert probe(webm, "video_conditioning", "video", max_frames=9).frames == 9
    for path, kind, kw, says in ((media["source"], "video", dict(max_frames=8), "has 9 frames; at most 8"),
                                 (webm, "video", dict(max_frames=8), "at most 8"),
                                 (media["source"], "video", dict(max_frames=9, max_side=32), "64x64"),
                                 (media["reference"], "audio", dict(max_frames=9), "no audio stream"),
                                 (media["speech"], "video", dict(max_frames=9), "no video stream")):
        with pytest.raises(ApiError) as e:
            probe(path, "f", kind, **kw)
        assert e.value.status == 400 and e.value.param == "f" and says in e.value.message, e.value.message
    cut = tmp_path / "cut.mp4"  # the header, then not enough of the data to decode a frame
    data = media["reference"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ApiError) as e:
        probe(cut, "video_reference", "video", max_frames=9)
    assert e.value.param == "video_reference"


def test_a_playlist_cannot_make_the_probe_read_another_file(tmp_path, media):
    """An .m3u8 upload naming a video elsewhere on the server must not be opened as that video
    (review finding: the hls demuxer decoded the other file and the probe accepted it)."""
    from ltx2_tp.serving.errors import ApiError
    from ltx2_tp.serving.media_probe import probe

    secret = media["reference"]  # another file on the server (9 frames)
    playlist = tmp_path / "video_reference.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    with pytest.raises(ApiError) as e:
        probe(playlist, "video_reference", "video", 2001)
    assert e.value.status == 400 and e.value.param == "video_reference"
    assert probe(secret, "video_reference", "video", 2001).frames == 9  # a real MP4 still opens
