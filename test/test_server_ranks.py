"""The server's worker driving two ranks (gloo, CPU; sequence parallel, ring of 2): a failure on rank 1
alone, at a step boundary or inside a DiT collective rank 0 is waiting in, fails the job on both
ranks, and the next job completes with the same video as before; a cancel stops both ranks at the
same step. No HTTP here: the job manager is driven directly (test_server.py covers the routes, and
its torchrun test the `serve` command on two ranks)."""

from __future__ import annotations

import time

import numpy as np
import torch
from dist_utils import run_distributed

SMALL = dict(width=128, height=128, num_frames=9, num_inference_steps=2)
TIMEOUT_S = 3  # the DiT collective rank 0 is left in gives up after this


class InjectFailures:
    """Rank 1's pipeline: 'FAIL-EARLY' raises before any collective (rank 0 learns it at the first
    step agreement); 'FAIL-INSIDE' runs out of memory in a DiT block's forward of the second step,
    while rank 0 already waits in that block's ring attention. Records each job's last progress call."""

    def __init__(self, inner, rank: int):
        self.inner, self.rank, self.c = inner, rank, inner.c
        self.last: list[tuple[str, int]] = []
        self.calls = 0
        blocks = [m for m in inner.c.transformer.modules() if type(m).__name__.endswith("Block")]
        blocks[-1].register_forward_pre_hook(self._hook)
        self.armed = False

    def _hook(self, *_):
        if self.armed:
            self.calls += 1
            if self.calls == 2:  # the second step
                self.armed = False
                raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1)")

    def __call__(self, req, path, progress=None):
        seen = []

        def record(stage, done, total):
            seen.append((stage, done))
            progress(stage, done, total)

        try:
            if self.rank == 1 and req.prompt == "FAIL-EARLY":
                raise RuntimeError("injected on rank 1 before any collective")
            self.armed, self.calls = self.rank == 1 and req.prompt == "FAIL-INSIDE", 0
            return self.inner(req, path, progress=record)
        finally:
            self.last.append(seen[-1] if seen else None)


def _serve_two_ranks(rank, world, outdir):
    from ltx2_tp.distributed.context import build_groups
    from ltx2_tp.pipelines.tiny import build_tiny_components
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.request import GenerationRequest
    from ltx2_tp.serving.job import Job
    from ltx2_tp.serving.jobs import JobManager
    from ltx2_tp.serving import ranks
    from ltx2_tp.serving.ranks import ControlChannel, LeaderPipeline, RankSync, follow

    ctx = build_groups(1, 1, 2)
    pipe = InjectFailures(get_pipeline_class("LTX2LongVideo")(build_tiny_components(0, ctx=ctx)), rank)
    channel = ControlChannel()
    sync = RankSync(channel, ctx, "cpu", collective_timeout_s=TIMEOUT_S)
    if rank != 0:
        follow(pipe, channel, sync)
        return {"last": pipe.last}
    leader = LeaderPipeline(pipe, channel, sync)
    manager = JobManager(leader, outdir, max_queue=8)
    first_ring_group = ctx.ring_group.group_name  # a name: a reference would keep the old group open

    def run(prompt, cancel_after_progress=None, **kw):
        job = manager.submit(Job(id=manager.new_id(), request=GenerationRequest(prompt=prompt, **{**SMALL, **kw}),
                                 model="tiny", seconds="1", size="128x128"))
        t0 = time.time()
        while True:
            try:
                j = manager.get(job.id)
            except KeyError:
                return None, time.time() - t0  # deleted
            if cancel_after_progress is not None and j.progress > cancel_after_progress:
                manager.delete(job.id)
                cancel_after_progress = None
            if j.status in ("completed", "failed"):
                return j, time.time() - t0
            assert time.time() - t0 < 300, j
            time.sleep(0.01)

    def frames(j):
        import av

        with av.open(str(manager.files.video(j))) as f:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])

    out = {}
    a, _ = run("a fox", seed=1)
    out["a"] = (a.status, frames(a))
    ranks.HEARTBEAT_S = 0.2
    time.sleep(1.5)  # idle: the leader pings rank 1 (the worker wakes every second), which keeps following
    early, _ = run("FAIL-EARLY")
    out["early"] = (early.status, early.error)
    inside, t_inside = run("FAIL-INSIDE")
    out["inside"] = (inside.status, inside.error, t_inside)
    out["groups_replaced"] = ctx.ring_group.group_name != first_ring_group
    c, _ = run("a fox", seed=1)  # the same request again, on the fresh groups
    out["c"] = (c.status, frames(c))
    gone, _ = run("cancel me", cancel_after_progress=0, num_inference_steps=60)
    out["cancelled"] = gone is None
    e, _ = run("a fox", seed=1)
    out["e"] = (e.status, frames(e))
    out["memory"] = leader.rank_memory()
    manager.close()
    leader.stop()
    out["last"] = pipe.last
    return out


def test_failure_on_one_rank_fails_the_job_on_all_and_the_next_job_runs(tmp_path):
    r0, r1 = run_distributed(_serve_two_ranks, 2, str(tmp_path / "srv"))
    assert r0["a"][0] == "completed"
    assert r0["early"][0] == "failed" and r0["early"][1]["code"] == "rank_failed", r0["early"]
    status, error, seconds = r0["inside"]
    assert status == "failed" and error["code"] == "out_of_memory" and "rank 1" in error["message"], error
    assert seconds < 30  # rank 0 left the ring exchange once rank 1 released its groups
    assert r0["groups_replaced"]
    for k in ("c", "e"):  # same request, same video, bit for bit, after the failure and after the cancel
        assert r0[k][0] == "completed" and np.array_equal(r0[k][1], r0["a"][1]), k
    assert r0["cancelled"]
    # both ranks left every job at the same progress call: the cancel (4th job) inside stage 1
    assert r0["last"][4] == r1["last"][4] and r0["last"][4][0] == "stage1" and 0 < r0["last"][4][1] < 60
    assert r0["last"][1] == ("stage1", 0) and r1["last"][1] is None  # FAIL-EARLY: at the first agreement
    assert r0["memory"] == [(0, 0), (0, 0)]  # CPU: every rank reports, and reports 0
