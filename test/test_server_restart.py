"""What survives a restart on the same output directory: the job store (SQLite) and the sweep.

The state a crash leaves (a running job with half-written files, a queued image-to-video job, an
expired and a soon-expiring completed job, files no job owns) is built through the store, then a
new JobManager starts on it. A real kill -9 of a server process is in test_soak.py."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ltx2_tp.pipelines.tiny import build_tiny_components
from ltx2_tp.pipelines.registry import get_pipeline_class
from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.serving.api import create_app
from ltx2_tp.serving.job import Job, new_job_id
from ltx2_tp.serving.jobs import JobManager
from ltx2_tp.serving.sqlite_store import SQLiteJobStore
from server_utils import wait_done

SMALL = dict(width=128, height=128, num_frames=9, num_inference_steps=1)


@pytest.fixture(scope="module")
def pipe():
    return get_pipeline_class("LTX2LongVideo")(build_tiny_components(0))


def _job(prompt="p", **kw):
    return Job(id=new_job_id(), request=GenerationRequest(prompt=prompt, **{**SMALL, **kw}), model="ltx-2-tiny",
               seconds="1", size="128x128")


def test_restart_keeps_completed_fails_running_requeues_queued_and_sweeps(tmp_path, pipe, caplog):
    out = tmp_path / "srv"
    m1 = JobManager(pipe, out, ttl_s=3600)
    a = m1.submit(_job("a"))
    assert wait_done(m1, a.id).status == "completed"
    video_a = (out / a.id / "video.mp4").read_bytes()
    m1.close()

    # the state a kill -9 leaves behind, written through the store as the server would have
    store = SQLiteJobStore(out)
    now = int(time.time())
    running = _job("running")
    store.add(running, 8)
    assert store.claim_next(time.time()).id == running.id
    (out / ".tmp" / running.id).mkdir(parents=True)
    (out / ".tmp" / running.id / ".video.mp4.partial").write_bytes(b"half")
    expired, soon = _job("expired"), _job("soon")
    for j, expires in ((expired, now - 1), (soon, now + 4)):
        store.add(j, 8)
        assert store.claim_next(time.time()).id == j.id
        store.finish(j.id, "completed", now, expires)
        shutil.copytree(out / a.id, out / j.id)
    queued = _job("queued i2v")
    queued.request.image_path = str(out / queued.id / "input_reference.png")
    (out / queued.id).mkdir()
    Image.new("RGB", (64, 64), (0, 120, 255)).save(out / queued.id / "input_reference.png")
    store.add(queued, 8)
    store.close()
    orphan = out / new_job_id()
    orphan.mkdir()
    (orphan / "video.mp4").write_bytes(b"x" * 1000)
    (out / a.id / ".thumbnail.png.partial").write_bytes(b"stray")
    (out / "notes.txt").write_text("not ours")

    with caplog.at_level("INFO", logger="ltx2_tp.serving.jobs"):
        m2 = JobManager(pipe, out, ttl_s=3600)
        try:
            # completed: listed and downloadable (until they expire)
            assert m2.get(a.id).status == "completed" and m2.get(soon.id).status == "completed"
            client = TestClient(create_app(m2))
            r = client.get(f"/v1/videos/{a.id}/content")
            assert r.status_code == 200 and r.content == video_a
            assert client.get(f"/v1/videos/{a.id}/content?variant=thumbnail").status_code == 200
            # running at the crash: failed with server_restarted, owns no file
            j = m2.get(running.id)
            assert j.status == "failed" and j.error["code"] == "server_restarted" and j.expires_at > now
            assert not (out / running.id).exists() and not (out / ".tmp" / running.id).exists()
            # queued at the crash: runs again, with its image
            assert wait_done(m2, queued.id).status == "completed"
            assert not (out / queued.id / "input_reference.png").exists()  # the upload goes once the job is done
            # expired while down: gone; the sweep removed what nothing owns, and only that
            with pytest.raises(KeyError):
                m2.get(expired.id)
            assert not (out / expired.id).exists() and not orphan.exists()
            assert not (out / a.id / ".thumbnail.png.partial").exists() and (out / "notes.txt").exists()
            assert sorted(p.name for p in (out / a.id).iterdir()) == ["thumbnail.png", "video.mp4"]
            # expiry goes on from the persisted expires_at
            time.sleep(max(0.0, now + 4.2 - time.time()))
            with pytest.raises(KeyError):
                m2.get(soon.id)
            assert not (out / soon.id).exists()
            assert [x["id"] for x in client.get("/v1/videos?order=asc").json()["data"]] == [a.id, running.id, queued.id]
        finally:
            m2.close()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ltx2_tp.serving.jobs"]
    assert {"id": running.id, "status": "failed", "code": "server_restarted"}.items() <= next(
        x for x in lines if x["id"] == running.id).items()
    assert any(x["id"] == queued.id and x["status"] == "requeued" for x in lines)


def test_store_refuses_beyond_the_queue_limit_and_claims_in_order(tmp_path):
    store = SQLiteJobStore(tmp_path)
    jobs = [_job(f"p{i}") for i in range(3)]
    assert store.add(jobs[0], 2) and store.add(jobs[1], 2) and not store.add(jobs[2], 2)
    assert store.claim_next(0.0).id == jobs[0].id and store.add(jobs[2], 2)
    assert [store.claim_next(0.0).id for _ in range(2)] == [jobs[1].id, jobs[2].id] and store.claim_next(0.0) is None
    assert store.set_progress(jobs[0].id, 50) and store.get(jobs[0].id).progress == 50
    assert store.delete(jobs[0].id).id == jobs[0].id and not store.set_progress(jobs[0].id, 60)
    assert store.get(jobs[0].id) is None
    store.close()


def test_a_row_written_by_another_version_still_loads(tmp_path):
    store = SQLiteJobStore(tmp_path)
    j = _job("p")
    store.add(j, 8)
    fields = json.loads(store._db.execute("SELECT request FROM jobs").fetchone()[0])
    store._db.execute("UPDATE jobs SET request = ?", (json.dumps({**fields, "field_from_the_future": 1}),))
    assert store.get(j.id).request.prompt == "p"
    store.close()
