"""Warm starts: `serve --warmup` runs its shapes before taking requests (/health 503 warming_up until
then), and the compile cache (compile.py) lets a second process load compiled block graphs.

The two-process compile-cache test compiles the tiny DiT's block with inductor on CPU (82 s, then
10 s from the cache, measured on the 2-core machine under load): slow, so it runs only with
LTX2_TP_SLOW=1:
    LTX2_TP_SLOW=1 python -m pytest -q test/test_warm_start.py -k cache
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from ltx2_tp.pipelines.registry import get_pipeline_class
from ltx2_tp.pipelines.tiny import build_tiny_components
from ltx2_tp.serving.api import create_app
from ltx2_tp.serving.jobs import JobManager
from ltx2_tp.serving.params import Limits
from ltx2_tp.serving.warmup import WARMUP_STEPS, warmup_requests


class Gated:
    """The tiny pipeline, held at its first call until `go` is set; records each call's request."""

    def __init__(self, inner):
        self.inner, self.c = inner, inner.c
        self.go, self.calls = threading.Event(), []

    def __call__(self, req, path, progress=None):
        self.calls.append((req, path))
        assert self.go.wait(60)
        return self.inner(req, path, progress=progress)


def test_warmup_before_requests_and_health(tmp_path):
    pipe = Gated(get_pipeline_class("LTX2LongVideo")(build_tiny_components(0)))
    shapes = warmup_requests("128x128x9,192x128x9", Limits())
    manager = JobManager(pipe, tmp_path, warmup=shapes)
    try:
        http = TestClient(create_app(manager))
        r = http.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "warming_up"})
        r = http.post("/v1/videos", json={"prompt": "a fox", "size": "128x128", "seconds": "0.4"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "warming_up" and r.headers["retry-after"]
        pipe.go.set()
        for _ in range(600):
            if not manager.warming_up:
                break
            time.sleep(0.05)
        r = http.get("/health")
        assert (r.status_code, r.json()["status"]) == (200, "ok")
        assert [(q.width, q.height, q.num_frames, q.num_inference_steps) for q, _ in pipe.calls] == [
            (128, 128, 9, WARMUP_STEPS), (192, 128, 9, WARMUP_STEPS)]
        assert not any(p.exists() for _, p in pipe.calls) and not (tmp_path / ".tmp" / "warmup").exists()
        r = http.post("/v1/videos", json={"prompt": "a fox", "size": "128x128", "seconds": "0.4", "steps": 1})
        assert r.status_code == 200, r.text
    finally:
        manager.close()


def test_failed_warmup_stops_the_server(tmp_path):
    class Broken:
        c = None

        def __call__(self, req, path, progress=None):
            raise RuntimeError("no memory for this shape")

    stopped = []
    manager = JobManager(Broken(), tmp_path, warmup=warmup_requests("128x128x9", Limits()))
    manager.on_fatal = stopped.append
    manager.worker.join(10)
    assert not manager.worker.is_alive() and manager.warmup_error.startswith("RuntimeError: no memory")
    r = TestClient(create_app(manager)).get("/health")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    manager.close()


def test_warmup_shapes_are_checked():
    limits = Limits(max_video_tokens=1000)
    for text, msg in (("128x128", "is not WIDTHxHEIGHTxFRAMES"), ("100x128x9", "width: must be a multiple of 64"),
                      ("128x128x10", "num_frames: must be 8k+1"), ("1024x1024x121", "video tokens")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            warmup_requests(text, limits)


def test_serve_warmup_from_the_command_line(tmp_path):
    """`ltx2-tp serve --warmup`: /health is 503 or not yet listening, then 200 once the warm-up line
    is logged; the compile cache directory defaults to OUTPUT_DIR/compile_cache (made when compiling)."""
    from dist_utils import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ltx2_tp.cli", "serve", "--port", str(port), "--output-dir",
                             str(tmp_path / "srv"), "--warmup", "128x128x9"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        seen = []
        for _ in range(1200):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                seen.append(r.status_code)
                if r.status_code == 200:
                    break
                assert r.json() == {"status": "warming_up"}
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert seen and seen[-1] == 200, seen
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    warm = [x for x in lines if x.get("event") == "warmup"]
    assert len(warm) == 1 and warm[0]["size"] == "128x128x9" and warm[0]["steps"] == WARMUP_STEPS, out[-3000:]


_PROBE = """
import json, sys, torch
sys.path.insert(0, {test!r})
from reference import make_inputs, tiny_config
from ltx2_tp.compile import compile_blocks, compile_cache_stats, use_compile_cache
from ltx2_tp.models.ltx2.weights import build_model
use_compile_cache(sys.argv[1])
cfg = tiny_config()
model = build_model(cfg, dtype=torch.float32, seed=2)
v, a = make_inputs(cfg, frames=2, h=2, w=3, audio_tokens=5)
compile_blocks(model)
with torch.no_grad():
    ov, oa = model(v, a)
torch.save((ov, oa), sys.argv[2])
print(json.dumps(compile_cache_stats()))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LTX2_TP_SLOW"), reason="compiles with inductor on CPU (~1.5 min): "
                    "LTX2_TP_SLOW=1 python -m pytest -q test/test_warm_start.py -k cache")
def test_compile_cache_reused_by_a_second_process(tmp_path):
    """A process compiles the tiny DiT's blocks into the cache; a second one loads them (FX graph and
    AOTAutograd cache hits, no miss: nothing compiled) and computes the same output, to the bit."""
    import torch

    script = _PROBE.format(test=os.path.dirname(__file__))
    stats = []
    for i in range(2):
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), str(tmp_path / f"out{i}.pt")],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        stats.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert stats[0]["fx_graph_cache_misses"] >= 1, stats
    assert stats[1]["fx_graph_cache_misses"] == 0 and stats[1]["fx_graph_cache_hits"] >= 1, stats
    assert stats[1]["aot_autograd_cache_misses"] == 0, stats
    (v0, a0), (v1, a1) = (torch.load(tmp_path / f"out{i}.pt") for i in range(2))
    assert torch.equal(v0, v1) and torch.equal(a0, a1)
