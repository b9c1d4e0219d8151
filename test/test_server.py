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
    """The real pipeline, except prompts starting with 'OOM' / 'CRASH' fail inside the job."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, req, path, progress=None):
        if req.prompt.startswith("OOM"):
            torch.empty(1)  # the job ran; then the GPU "runs out"
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")
        if req.prompt.startswith("CRASH"):
            raise RuntimeError("simulated failure inside the pipeline")
        if req.prompt.startswith("SLOW"):
            time.sleep(1.0)
        return self.inner(req, path, progress=progress)


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
    assert done.seconds == "4" and done.size == "1280x720"
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
    with pytest.raises(openai.RateLimitError):
        for _ in range(5):  # queue of 3 behind one running job
            client.videos.create(prompt="SLOW", extra_body=SMALL)
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
