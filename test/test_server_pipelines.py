"""A request picks its pipeline: `model` (a class name, its alias, or the served model name = the
default) or extra_body `pipeline`. Driven by the official `openai` client over the app in process
(its http_client is Starlette's TestClient). Each video is the one `ltx2-tp generate
--pipeline-class-name X` writes for the same seed: the MP4 bytes are equal (same latents, same
encoder settings, no timestamps in the file). A restarted server resumes a queued job with its
pipeline; an old database (before the pipeline column) keeps loading."""

from __future__ import annotations

import json
import sqlite3

import openai
import pytest
from fastapi.testclient import TestClient

from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.pipelines.tiny import build_tiny_components
from ltx2_tp.serving.api import create_app
from ltx2_tp.serving.job import Job, new_job_id
from ltx2_tp.serving.jobs import JobManager
from ltx2_tp.serving.pipelines import ServedPipelines
from ltx2_tp.serving.sqlite_store import SQLiteJobStore
from server_utils import wait_done

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
SIZE = {"width": 128, "height": 128, "num_frames": 9}
STEPS = 2


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, components):
    out = tmp_path_factory.mktemp("server")
    pipes = ServedPipelines(components, "LTX2LongVideo", "ltx-2-tiny")
    manager = JobManager(pipes, out, max_queue=8, idle_poll_s=0.05)
    app = create_app(manager, model_name="ltx-2-tiny", pipelines=pipes, max_video_tokens=5000)
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), manager, out
    manager.close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """name -> the MP4 bytes `ltx2-tp generate --pipeline-class-name name` writes (in process: the CLI's main)."""
    from ltx2_tp.cli import main

    out, cache = tmp_path_factory.mktemp("generate"), {}

    def get(name: str, steps: int | None = STEPS) -> bytes:
        if name not in cache:
            path = out / f"{name}.mp4"
            flags = ["--num-inference-steps", str(steps)] if steps else []
            assert main(["generate", "--prompt", "a fox", "--seed", "3", "--width", "128", "--height", "128",
                         "--num-frames", "9", "--pipeline-class-name", name, *flags, "--output-path", str(path)]) == 0
            cache[name] = path.read_bytes()
        return cache[name]

    return get


def _video(server, **kw) -> bytes:
    client, manager, _ = server
    v = client.videos.create(prompt="a fox", **kw)
    assert wait_done(manager, v.id).status == "completed", manager.get(v.id).error
    return client.videos.download_content(v.id).read()


@pytest.mark.parametrize("how,name,steps", [
    (dict(extra_body={**SIZE, "seed": 3, "num_inference_steps": STEPS}), "LTX2LongVideo", STEPS),  # default
    (dict(model="ltx-2-tiny", extra_body={**SIZE, "seed": 3, "num_inference_steps": STEPS}), "LTX2LongVideo", STEPS),
    (dict(model="LTX2DistilledPipeline", extra_body={**SIZE, "seed": 3}), "LTX2DistilledPipeline", None),
    (dict(extra_body={**SIZE, "seed": 3, "pipeline": "ti2vid_one_stage", "num_inference_steps": STEPS}),
     "LTX2Pipeline", STEPS),
])
def test_each_pipeline_equals_generate(server, generated, how, name, steps):
    assert _video(server, **how) == generated(name, steps)


def test_models_lists_the_pipelines(server):
    client = server[0]
    models = {m.id: m for m in client.models.list().data}
    assert list(models)[:2] == ["ltx-2-tiny", "LTX2LongVideo"]
    assert {"LTX2DistilledPipeline", "LTX2Pipeline", "LTX2TwoStagePipeline", "LTX2TwoStageHQPipeline",
            "LTX2KeyframeInterpolationPipeline"} <= set(models)
    assert {"LTX2RetakePipeline", "LTX2A2VidPipeline", "LTX2ICLoraPipeline"} <= set(models)  # their inputs are uploads
    assert models["ltx-2-tiny"].pipeline == "LTX2LongVideo" and "distilled" in models["LTX2DistilledPipeline"].aliases


@pytest.mark.parametrize("kw,param,says", [
    (dict(model="nope"), "model", "unknown model"),
    (dict(extra_body={"pipeline": "nope"}), "pipeline", "unknown pipeline"),
    (dict(model="LTX2Pipeline", extra_body={"pipeline": "distilled"}), "pipeline", "different pipelines"),
    (dict(model="LTX2RetakePipeline"), "video_reference", "needs the retake pipeline's source video"),
    (dict(extra_body={"pipeline": "a2vid_two_stage"}), "audio_path", "needs A2Vid's audio"),
    (dict(model="LTX2KeyframeInterpolationPipeline"), "input_reference", "at least one image"),
    (dict(extra_body={"video_rescale_scale": 2}), "video_rescale_scale", "between 0 and 1"),
    (dict(extra_body={"audio_cfg_guidance_scale": "inf"}), "audio_cfg_guidance_scale", "finite"),
    (dict(extra_body={"video_stg_blocks": "[0, 7]"}), "video_stg_blocks", "between 0 and 1"),
    (dict(extra_body={"video_skip_step": 1.5}), "video_skip_step", "integer"),
    (dict(model="distilled", extra_body={"num_inference_steps": 2}), "num_inference_steps", "fixed 8"),
    (dict(model="distilled", extra_body={"guidance_scale": 4}), "guidance_scale", "without guidance"),
    (dict(extra_body={"width": 96, "height": 96}), "width", "multiple of 64"),
])
def test_bad_pipeline_fields_are_400s_naming_the_field(server, kw, param, says):
    client = server[0]
    extra = kw.pop("extra_body", {})
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", extra_body={**SIZE, **extra}, **kw)
    body = e.value.body
    assert body["param"] == param and says in body["message"], body


@pytest.mark.parametrize("model", [None, "LTX2TwoStagePipeline", "distilled", "LTX2TwoStageHQPipeline"])
def test_64x64x1_is_a_400_naming_the_smallest_size(server, model):
    """Every pipeline whose stage 2 upsamples: stage 1's latent of 1x1x1 is below the tiny upsampler's
    GroupNorm (was a failed job); the one-stage pipeline takes it."""
    client = server[0]
    kw = {"model": model} if model else {}
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", size="64x64", extra_body={"num_frames": 1}, **kw)
    assert e.value.body["param"] == "size" and "128x64" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # given as extra_body width: that field is named
        client.videos.create(prompt="x", extra_body={"width": 64, "height": 64, "num_frames": 1}, **kw)
    assert e.value.body["param"] == "width"


def test_one_stage_takes_multiples_of_32_and_64x64x1(server):
    client, manager, _ = server
    for extra in ({"width": 96, "height": 96, "num_frames": 9}, {"width": 64, "height": 64, "num_frames": 1}):
        v = client.videos.create(prompt="x", model="LTX2Pipeline", extra_body={**extra, "num_inference_steps": 1})
        assert v.size == f"{extra['width']}x{extra['height']}"
        assert wait_done(manager, v.id).status == "completed"


def test_generate_refuses_64x64x1_naming_the_flag(tmp_path, capsys):
    from ltx2_tp.cli import main

    path = tmp_path / "no.mp4"
    assert main(["generate", "--prompt", "x", "--width", "64", "--height", "64", "--num-frames", "1",
                 "--num-inference-steps", "1", "--output-path", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--width: 64x64 with 1 frames" in err and "128x64" in err and not path.exists()


# ---- the store -------------------------------------------------------------------------------
def test_restart_resumes_a_queued_job_with_its_pipeline(tmp_path, components, generated):
    out = tmp_path / "srv"
    out.mkdir()
    store = SQLiteJobStore(out)  # what a stopped server left: one queued distilled job
    req = GenerationRequest(prompt="a fox", seed=3, num_inference_steps=8, pipeline="LTX2DistilledPipeline", **SIZE)
    job = Job(id=new_job_id(), request=req, model="distilled", seconds="1", size="128x128")
    store.add(job, 8)
    store.close()
    pipes = ServedPipelines(components, "LTX2LongVideo", "ltx-2-tiny")
    m = JobManager(pipes, out, idle_poll_s=0.05)
    try:
        assert wait_done(m, job.id).status == "completed"
        assert m.get(job.id).request.pipeline == "LTX2DistilledPipeline"
        assert (out / job.id / "video.mp4").read_bytes() == generated("LTX2DistilledPipeline", None)
    finally:
        m.close()


OLD_SCHEMA = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, request TEXT NOT NULL,
    model TEXT NOT NULL, seconds TEXT NOT NULL, size TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0, started_at REAL, completed_at INTEGER, expires_at INTEGER, error TEXT);
CREATE INDEX jobs_status ON jobs (status, seq);
"""


def test_a_database_from_before_the_pipeline_column_opens_and_runs_with_the_default(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(OLD_SCHEMA)
    old = {"prompt": "old", "width": 128, "height": 128, "num_frames": 9, "num_inference_steps": 1}  # no pipeline key
    done = {"prompt": "done", "width": 128, "height": 128}
    db.execute("INSERT INTO jobs (id, request, model, seconds, size, created_at, status) VALUES (?, ?, ?, ?, ?, ?, ?)",
               ("video_" + "a" * 32, json.dumps(old), "ltx-2-tiny", "1", "128x128", 1, "queued"))
    db.execute("INSERT INTO jobs (id, request, model, seconds, size, created_at, status, completed_at, expires_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ("video_" + "b" * 32, json.dumps(done), "ltx-2-tiny", "1", "128x128", 1, "completed", 2, 2**40))
    db.commit()
    db.close()
    store = SQLiteJobStore(tmp_path)
    try:
        jobs = store.list()
        assert [j.request.prompt for j in jobs] == ["old", "done"] and all(j.request.pipeline is None for j in jobs)
        assert [j.status for j in jobs] == ["queued", "completed"]
        new = Job(id=new_job_id(), request=GenerationRequest(prompt="new", pipeline="LTX2Pipeline"), model="m",
                  seconds="1", size="768x512")
        assert store.add(new, 8) and store.get(new.id).request.pipeline == "LTX2Pipeline"
        assert store.claim_next(0.0).request.pipeline is None  # the old queued job: the server's default runs it
    finally:
        store.close()
    cols = [r[1] for r in sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA table_info(jobs)")]
    assert cols[-1] == "pipeline"


# ---- several ranks ---------------------------------------------------------------------------
def _two_ranks(rank, world, outdir):
    from ltx2_tp.distributed.context import build_groups
    from ltx2_tp.serving.ranks import ControlChannel, LeaderPipeline, RankSync, follow

    ctx = build_groups(1, 1, 2)
    pipes = ServedPipelines(build_tiny_components(0, ctx=ctx), "LTX2LongVideo", "ltx-2-tiny")
    channel = ControlChannel()
    sync = RankSync(channel, ctx, "cpu")
    if rank != 0:
        follow(pipes, channel, sync)
        return sorted(pipes._built)
    leader = LeaderPipeline(pipes, channel, sync)
    manager = JobManager(leader, outdir, idle_poll_s=0.05)

    def run(**kw):
        req = GenerationRequest(prompt="a fox", seed=3, pipeline="LTX2DistilledPipeline", num_inference_steps=8, **kw)
        return wait_done(manager, manager.submit(Job(id=new_job_id(), request=req, model="m", seconds="1", size="s")).id)

    try:
        bad = run(width=64, height=64, num_frames=1)  # past the HTTP check: the leader's check refuses it
        good = run(**SIZE)
        return {"bad": (bad.status, bad.error), "good": good.status, "built": sorted(pipes._built)}
    finally:
        manager.close()
        leader.stop()


def test_two_ranks_run_the_pipeline_the_job_names(tmp_path):
    """LeaderPipeline checks with the job's pipeline (a refused job fails on rank 0 before any rank
    starts it) and every rank runs the job's pipeline (gloo, ring of 2)."""
    from dist_utils import run_distributed

    r0, r1 = run_distributed(_two_ranks, 2, str(tmp_path / "srv"))
    assert r0["bad"][0] == "failed" and r0["bad"][1]["code"] == "invalid_request" and "128x64" in r0["bad"][1]["message"]
    assert r0["good"] == "completed"
    assert r0["built"] == r1 == ["LTX2DistilledPipeline"]


def test_the_memory_cap_checks_the_pipeline_a_request_picks(components):
    """serve --max-gpu-memory: a request is planned as the pipeline it names runs (stages, guidance
    passes), not as the server's default: the distilled pipeline fits more frames than LTX2LongVideo."""
    from ltx2_tp.memory.planner import Layout, PlanError
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.pipelines.planning import CapCheck
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.serving.errors import ApiError
    from ltx2_tp.serving.params import Limits, video_request

    cfg = get_config("tiny")
    cap = CapCheck(cfg, get_pipeline_class("LTX2DistilledPipeline"), 4 * 2**20, Layout(), None, 0, "tiny", 4)
    limits = Limits(max_frames=2001, cap=cap)
    pipes = ServedPipelines(components, "LTX2DistilledPipeline", "ltx-2-tiny")
    long_cap = CapCheck(cfg, get_pipeline_class("LTX2LongVideo"), 4 * 2**20, Layout(), None, 0, "tiny", 4)
    with pytest.raises(PlanError) as e:
        long_cap.plan(128, 128, 2001, 24.0)
    frames = e.value.largest_frames
    cap.plan(128, 128, frames + 8, 24.0)  # the distilled plan takes more at this cap
    fields = {"prompt": "x", "size": "128x128", "num_frames": frames + 8}
    video_request(fields, limits, pipes)  # as the default (distilled): fits
    with pytest.raises(ApiError) as err:
        video_request({**fields, "pipeline": "LTX2LongVideo", "long_video_mode": "dense"}, limits, pipes)
    assert err.value.param == "num_frames" and str(frames) in err.value.message
