"""The /v1/videos server on 127.0.0.1 with the tiny model, driven by the official `openai` client."""

from __future__ import annotations

import io
import threading
import time

import av
import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from dist_utils import free_port
from PIL import Image

from ltx2_tp.pipelines.tiny import build_tiny_components
from ltx2_tp.pipelines.registry import get_pipeline_class
from ltx2_tp.serving.api import create_app
from ltx2_tp.serving.jobs import JobManager

SMALL = {"width": 128, "height": 128, "num_frames": 9, "num_inference_steps": 2}
KEY = "sk-test"


class FlakyPipeline:
    """The real pipeline, except prompts starting with 'OOM' / 'CRASH' fail inside the job, 'SLOW'
    waits first, 'STEPS' takes 0.1 s a step (its steps are recorded), 'LATE' waits after the last
    step (a long decode)."""

    def __init__(self, inner):
        self.inner = inner
        self.c = inner.c
        self.steps: list[tuple[str, int, int]] = []

    def __call__(self, req, path, progress=None):
        if req.prompt.startswith("OOM"):
            torch.empty(1)  # the job ran; then the GPU "runs out"
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")
        if req.prompt.startswith("CRASH"):
            raise RuntimeError("simulated failure inside the pipeline")
        if req.prompt.startswith("SLOW"):
            time.sleep(1.0)
        if req.prompt.startswith("STEPS"):
            self.steps.clear()
            inner_progress = progress

            def progress(stage, done, total):
                self.steps.append((stage, done, total))
                time.sleep(0.1)
                inner_progress(stage, done, total)

        result = self.inner(req, path, progress=progress)
        if req.prompt.startswith("LATE"):
            time.sleep(1.5)
        return result


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("server")
    pipe = FlakyPipeline(get_pipeline_class("LTX2LongVideo")(build_tiny_components(0)))
    manager = JobManager(pipe, out, max_queue=3, ttl_s=3600)
    app = create_app(manager, model_name="ltx-2-tiny", api_key=KEY, max_upload_bytes=200_000,
                     max_video_tokens=5000, poll_after_ms=50)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield base, manager, out
    srv.should_exit = True
    th.join(timeout=10)
    manager.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def wait(client, vid, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        v = client.videos.retrieve(vid)
        if v.status in ("completed", "failed"):
            return v
        time.sleep(0.05)
    raise TimeoutError(vid)


def decode(data: bytes):
    with av.open(io.BytesIO(data)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    with av.open(io.BytesIO(data)) as f:
        audio = [s.codec_context.name for s in f.streams.audio]
    return np.stack(frames), audio


def test_create_poll_retrieve_list_download_delete(client, server):
    base, manager, out = server
    v = client.videos.create(prompt="a red fox", model="ltx-2-tiny", seconds="4", size="1280x720", extra_body=SMALL)
    assert v.status == "queued" and v.object == "video" and v.id.startswith("video_")
    raw = httpx.get(f"{base}/v1/videos/{v.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.headers["openai-poll-after-ms"] == "50"
    done = client.videos.poll(v.id, poll_interval_ms=50)
    assert done.status == "completed" and done.progress == 100 and done.completed_at and done.expires_at > done.completed_at
    assert done.seconds == "4" and done.size == "128x128"  # what is generated: extra_body's width x height
    frames, audio = decode(client.videos.download_content(v.id).read())
    assert frames.shape == (9, 128, 128, 3) and audio == ["aac"]
    thumb = Image.open(io.BytesIO(client.videos.download_content(v.id, variant="thumbnail").read()))
    assert thumb.size == (128, 128)
    assert v.id in [x.id for x in client.videos.list(limit=100)]
    assert (out / v.id / "video.mp4").exists()
    d = client.videos.delete(v.id)
    assert d.deleted and not (out / v.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(v.id)


def test_create_and_poll_with_image_reference(client):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((96, 96, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    v = client.videos.create_and_poll(prompt="the image comes alive", input_reference=("first.png", buf.getvalue(), "image/png"),
                                      extra_body=SMALL, poll_interval_ms=50)
    assert v.status == "completed"
    assert decode(client.videos.download_content(v.id).read())[0].shape[0] == 9


def test_list_pagination_and_order(client):
    ids = [client.videos.create(prompt=f"p{i}", extra_body=SMALL).id for i in range(3)]
    for i in ids:
        wait(client, i)
    asc = [v.id for v in client.videos.list(order="asc", limit=100)]
    assert [i for i in asc if i in ids] == ids
    page = client.videos.list(order="asc", limit=1, after=ids[0])
    assert [v.id for v in page.data] == [ids[1]] and page.has_more


@pytest.mark.parametrize("kwargs,param", [
    (dict(size="huge"), "size"),
    (dict(extra_body={**SMALL, "num_frames": 24}), "num_frames"),
    (dict(extra_body={**SMALL, "num_frames": 4001}), "num_frames"),
    (dict(extra_body={**SMALL, "width": 100}), "width"),
    (dict(extra_body={**SMALL, "seed": "abc"}), "seed"),
    (dict(model="sora-2", extra_body=SMALL), "model"),
    (dict(size="1920x1088", seconds="60"), "num_frames"),  # over the memory plan (5000 tokens)
    (dict(seconds="-1", extra_body=SMALL), "seconds"),
])
def test_bad_requests_name_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", **kwargs)
    assert e.value.body["param"] == param, e.value.body


def test_bad_uploads(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", input_reference=("a.png", b"not an image", "image/png"), extra_body=SMALL)
    assert e.value.body["param"] == "input_reference"
    big = io.BytesIO()
    Image.fromarray((np.random.default_rng(2).random((400, 400, 3)) * 255).astype(np.uint8)).save(big, format="PNG")
    with pytest.raises(openai.APIStatusError) as e:
        client.videos.create(prompt="x", input_reference=("big.png", big.getvalue(), "image/png"), extra_body=SMALL)
    assert e.value.status_code == 413 and e.value.body["param"] == "input_reference"


def test_ids_and_paths_are_guarded(server):
    base, _, out = server
    h = {"Authorization": f"Bearer {KEY}"}
    for bad in ("..", "video_../../etc", "video_" + "0" * 32, "%2e%2e%2fserver"):
        r = httpx.get(f"{base}/v1/videos/{bad}/content", headers=h)
        assert r.status_code == 404, (bad, r.status_code)


def test_api_key_required(server):
    base = server[0]
    assert httpx.get(f"{base}/v1/videos").status_code == 401
    assert httpx.get(f"{base}/v1/videos", headers={"Authorization": "Bearer wrong"}).status_code == 401
    c = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.videos.list()


def test_failures_mark_the_job_and_the_server_keeps_serving(client):
    oom = client.videos.create(prompt="OOM please", extra_body=SMALL)
    crash = client.videos.create(prompt="CRASH please", extra_body=SMALL)
    ok = client.videos.create(prompt="fine", extra_body=SMALL)
    o, c, k = wait(client, oom.id), wait(client, crash.id), wait(client, ok.id)
    assert o.status == "failed" and o.error.code == "out_of_memory" and "out of memory" in o.error.message
    assert c.status == "failed" and c.error.code == "internal_error"
    assert k.status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(oom.id)


def test_not_ready_content_is_409_and_full_queue_is_429(client):
    slow = [client.videos.create(prompt="SLOW", extra_body=SMALL) for _ in range(2)]
    with pytest.raises(openai.ConflictError):
        client.videos.download_content(slow[-1].id)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(5):  # queue of 3 behind one running job
            client.videos.create(prompt="SLOW", extra_body=SMALL)
    assert int(e.value.response.headers["retry-after"]) >= 1
    for v in client.videos.list(limit=100):
        if v.status in ("queued", "in_progress"):
            wait(client, v.id)


def test_concurrent_submissions(client):
    results = []

    def one(i):
        c = openai.OpenAI(base_url=str(client.base_url), api_key=KEY, max_retries=0, timeout=120)
        v = c.videos.create(prompt=f"concurrent {i}", extra_body={**SMALL, "seed": i})
        results.append(wait(c, v.id))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r.status == "completed" for r in results)


def test_multi_rank_server_drives_every_rank(tmp_path):
    """`torchrun --nproc-per-node 2 ltx2-tp serve --sp-size 2` (gloo, CPU): rank 0 serves, rank 1 follows
    each job; two jobs in a row complete, match a single-process pipeline's video, a bad request fails
    on rank 0 alone without wedging rank 1, and stopping the server ends both ranks."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ltx2_tp.cli",
                             "serve", "--model", "tiny", "--port", str(port), "--output-dir", str(tmp_path / "srv"),
                             "--num-gpus", "2", "--sp-size", "2", "--ring-size", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/videos", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(0.2)
        with pytest.raises(openai.BadRequestError):
            c.videos.create(prompt="x", extra_body={**SMALL, "num_frames": 24})
        got = []
        for seed in (1, 2):
            v = c.videos.create(prompt="a fox", extra_body={**SMALL, "seed": seed})
            v = wait(c, v.id, timeout=300)
            assert v.status == "completed", v.error
            got.append(decode(c.videos.download_content(v.id).read())[0])
        for seed, frames in zip((1, 2), got):  # the same two ranks through `ltx2-tp generate`: the same video
            out = tmp_path / f"gen{seed}.mp4"
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                                str(free_port()), "-m", "ltx2_tp.cli", "generate", "--prompt", "a fox", "--seed", str(seed),
                                "--width", "128", "--height", "128", "--num-frames", "9", "--num-inference-steps", "2",
                                "--num-gpus", "2", "--sp-size", "2", "--ring-size", "2", "--output-path", str(out)],
                               env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            with open(out, "rb") as f:
                assert np.array_equal(frames, decode(f.read())[0])
        assert not list((tmp_path / "srv").rglob("*.rank*"))  # followers keep no copies
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


# ---- cancellation ----------------------------------------------------------------------------
def _staged(out, vid):
    return (out / ".tmp" / vid).exists()


def test_delete_running_job_stops_it_at_the_next_step_and_leaves_no_file(client, server):
    base, manager, out = server
    pipe = manager.pipeline
    v = client.videos.create(prompt="STEPS to cancel", extra_body={**SMALL, "num_inference_steps": 40})
    t = time.time()
    while client.videos.retrieve(v.id).progress == 0:
        assert time.time() - t < 60
        time.sleep(0.02)
    assert client.videos.delete(v.id).deleted
    nxt = client.videos.create(prompt="next", extra_body=SMALL)  # the worker moves on at once
    done = wait(client, nxt.id)
    assert done.status == "completed"
    stage1 = [d for s, d, _ in pipe.steps if s == "stage1"]
    assert 0 < max(stage1) < 40 and not any(s == "stage2" for s, _, _ in pipe.steps)  # stopped within stage 1
    assert not (out / v.id).exists() and not _staged(out, v.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(v.id)


def test_delete_during_decode_publishes_nothing(client, server):
    _, manager, out = server
    v = client.videos.create(prompt="LATE decode", extra_body=SMALL)
    t = time.time()
    while client.videos.retrieve(v.id).progress < 95:  # every step done: only the (slow) decode is left
        assert time.time() - t < 60
        time.sleep(0.02)
    client.videos.delete(v.id)
    assert wait(client, client.videos.create(prompt="after", extra_body=SMALL).id).status == "completed"
    assert not (out / v.id).exists() and not _staged(out, v.id)


def test_delete_queued_job_removes_its_upload(client, server):
    _, manager, out = server
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    first = client.videos.create(prompt="SLOW first", extra_body=SMALL)
    queued = client.videos.create(prompt="i2v", input_reference=("a.png", buf.getvalue(), "image/png"), extra_body=SMALL)
    assert (out / queued.id / "input_reference.png").exists()
    client.videos.delete(queued.id)
    assert not (out / queued.id).exists()
    assert wait(client, first.id).status == "completed"


# ---- bad input: a 400 naming the field, in OpenAI's shape -------------------------------------
def _post(base, **kw):
    return httpx.post(f"{base}/v1/videos", headers={"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})},
                      timeout=30, **kw)


def _shape(r, status, param="?"):
    body = r.json()
    assert r.status_code == status, (r.status_code, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param != "?":
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("field,value", [
    ("seconds", "inf"), ("num_frames", "inf"), ("seed", "inf"), ("width", "inf"), ("fps", "nan"),
    ("height", "1e400"), ("guidance_scale", "-inf"), ("num_inference_steps", "2.5"), ("seed", "-1"),
    ("fps", "0"), ("seconds", "1e300"), ("num_frames", "9.0x"),
])
def test_non_finite_and_out_of_range_form_fields(server, field, value):
    fields = {"prompt": "x", **{k: str(v) for k, v in SMALL.items()}, field: value}
    _shape(_post(server[0], files={k: (None, v) for k, v in fields.items()}), 400, field)


@pytest.mark.parametrize("field,raw", [
    ("seconds", "Infinity"), ("fps", "NaN"), ("num_frames", "true"), ("seed", "false"), ("width", "[128]"),
    ("prompt", "42"), ("guidance_scale", "1e999"),
])
def test_non_finite_booleans_and_wrong_types_in_json(server, field, raw):
    body = '{"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 2, "%s": %s}' % (field, raw)
    _shape(_post(server[0], content=body, headers={"content-type": "application/json"}), 400, field)


def test_size_reports_what_is_generated(client):
    assert client.videos.create(prompt="p", size="13x70", extra_body={"num_frames": 9, "num_inference_steps": 1}).size == "64x64"
    assert client.videos.create(prompt="p", size="1280x720", extra_body=SMALL).size == "128x128"
    assert client.videos.create(prompt="p", size="200x130", extra_body={"num_frames": 9, "num_inference_steps": 1,
                                                                       "width": 64}).size == "64x128"
    for v in client.videos.list(limit=100):
        if v.status in ("queued", "in_progress"):
            client.videos.delete(v.id)


def test_prompt_and_body_limits(server):
    base = server[0]
    e = _shape(_post(base, json={"prompt": "x" * 10_001, **SMALL}), 400, "prompt")
    assert "10000" in e["message"]
    _shape(_post(base, json={"prompt": "x", "negative_prompt": "n" * 10_001, **SMALL}), 400, "negative_prompt")
    _shape(_post(base, json={"prompt": "x" * (8 * 2**20), **SMALL}), 413, None)  # refused from Content-Length

    def chunks():  # no Content-Length: counted as it streams in
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * 2**16
        yield b'"}'

    _shape(_post(base, content=chunks(), headers={"content-type": "application/json"}), 413)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (its pixels are never there): what a decompression bomb sends."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("side", [20000, 12000, 4097])
def test_image_pixel_limit_from_the_header(server, side):
    files = {"prompt": (None, "x"), **{k: (None, str(v)) for k, v in SMALL.items()},
             "input_reference": ("big.png", _png_header(side, 4096), "image/png")}
    t = time.time()
    e = _shape(_post(server[0], files=files), 400, "input_reference")
    assert time.time() - t < 2 and "pixels" in e["message"]


def test_image_decoding_does_not_block_the_server(server, monkeypatch):
    import ltx2_tp.serving.uploads as uploads

    base, manager, _ = server
    real = uploads._decode_and_save

    def slow(*a):
        time.sleep(2.0)
        return real(*a)

    monkeypatch.setattr(uploads, "_decode_and_save", slow)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    files = {"prompt": (None, "x"), **{k: (None, str(v)) for k, v in SMALL.items()},
             "input_reference": ("a.png", buf.getvalue(), "image/png")}
    th = threading.Thread(target=lambda: _post(base, files=files))
    th.start()
    time.sleep(0.3)
    t = time.time()
    assert httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert time.time() - t < 1.0  # answered while the image decodes
    th.join()
    for j in manager.list():
        if j.status in ("queued", "in_progress"):
            manager.delete(j.id)


def test_framework_errors_in_openai_shape(server):
    base = server[0]
    h = {"Authorization": f"Bearer {KEY}"}
    _shape(httpx.get(f"{base}/v2/nothing", headers=h), 404)
    r = httpx.put(f"{base}/v1/videos", headers=h)
    _shape(r, 405)
    assert "POST" in r.headers["allow"]  # the header stays
    _shape(httpx.get(f"{base}/v1/videos?limit=abc", headers=h), 400, "limit")
    _shape(httpx.get(f"{base}/v1/videos?limit=0", headers=h), 400, "limit")
    bad = b"--XX\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--XX\r\nContent-Disposition: form-data\r\n\r\n"
    _shape(_post(base, content=bad, headers={"content-type": "multipart/form-data; boundary=XX"}), 400)
    two = {"prompt": (None, "x"), "input_reference": ("a.png", b"1", "image/png"), "other": ("b.png", b"2", "image/png")}
    _shape(_post(base, files=two), 400)
    _shape(_post(base, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _shape(httpx.get(f"{base}/v1/videos"), 401)


# ---- observability ---------------------------------------------------------------------------
def test_metrics_and_job_log_lines(client, server, caplog):
    import json

    from prometheus_client.parser import text_string_to_metric_families

    base = server[0]
    with caplog.at_level("INFO", logger="ltx2_tp.serving.jobs"):
        v = client.videos.create_and_poll(prompt="observed", extra_body=SMALL, poll_interval_ms=50)
    assert v.status == "completed"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ltx2_tp.serving.jobs"]
    assert [x["status"] for x in lines if x["id"] == v.id] == ["queued", "in_progress", "completed"]
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fam.values() for s in f.samples}
    assert samples[("ltx2_queue_depth", ())] >= 0
    assert samples[("ltx2_jobs", (("status", "completed"),))] >= 1
    assert samples[("ltx2_jobs_finished_total", (("outcome", "completed"),))] >= 1
    assert samples[("ltx2_step_seconds_count", (("stage", "stage1"),))] >= 2
    assert samples[("ltx2_stage_seconds_count", (("stage", "stage1_denoise"),))] >= 1
    assert samples[("ltx2_gpu_memory_bytes", (("kind", "allocated"), ("rank", "0")))] == 0  # CPU
