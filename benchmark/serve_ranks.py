"""The server's rank orchestration on GPUs (NCCL): what test/test_server_ranks.py proves with gloo on CPU.

    torchrun --nproc-per-node 2 benchmark/serve_ranks.py --json benchmark/results/serve_ranks_2xh200.json
    torchrun --nproc-per-node 2 benchmark/serve_ranks.py --device cpu        (gloo: checks the script)

Rank 0 runs a JobManager over a LeaderPipeline, rank 1 follows (serving/ranks.py), as `ltx2-tp serve`
does under torchrun; the tiny model, sequence parallel over both ranks (ring of 2). Jobs, in order:
  a       completes; its frames are the reference
  oom     rank 1 raises torch.OutOfMemoryError in the last DiT block of step 2, after rank 0 has
          queued that block's ring exchange with it (NCCL: rank 0's CPU is not blocked by it)
  again   the same request as a, on the rebuilt groups
  cancel  --cancel-steps steps, deleted once progress > 0
  after   the same request as a, after the cancel
Then 200 step agreements are timed on every rank.

Should show: a / again / after completed with identical frames; oom failed with code out_of_memory
in seconds (not the collective timeout); cancel gone, both ranks' last step equal; an agreement
well under 1 ms; GPU memory > 0 for both ranks (as /metrics reports it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ltx2_tp.distributed.context import init_parallel  # noqa: E402
from ltx2_tp.pipelines.tiny import build_tiny_components  # noqa: E402
from ltx2_tp.pipelines.registry import get_pipeline_class  # noqa: E402
from ltx2_tp.pipelines.request import GenerationRequest  # noqa: E402
from ltx2_tp.serving.job import Job  # noqa: E402
from ltx2_tp.serving.jobs import JobManager  # noqa: E402
from ltx2_tp.serving.ranks import GO, ControlChannel, LeaderPipeline, RankSync, follow  # noqa: E402


class InjectOOM:
    """Rank 1's pipeline raises an out-of-memory in the last DiT block of step 2 for prompt 'OOM';
    every rank records each job's last progress call."""

    def __init__(self, inner, rank: int):
        self.inner, self.rank, self.c = inner, rank, inner.c
        self.last, self.armed, self.calls = [], False, 0
        blocks = [m for m in inner.c.transformer.modules() if type(m).__name__.endswith("Block")]
        blocks[-1].register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        if self.armed:
            self.calls += 1
            if self.calls == 2:
                self.armed = False
                raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1)")

    def __call__(self, req, path, progress=None):
        seen = []

        def record(stage, done, total):
            seen.append((stage, done))
            progress(stage, done, total)

        try:
            self.armed, self.calls = self.rank == 1 and req.prompt == "OOM", 0
            return self.inner(req, path, progress=record)
        finally:
            self.last.append(seen[-1] if seen else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cancel-steps", type=int, default=200)
    p.add_argument("--collective-timeout-s", type=float, default=60)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    ctx = init_parallel(1, 1, 2, backend="nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = InjectOOM(get_pipeline_class("LTX2LongVideo")(build_tiny_components(0, device=device, dtype=dtype, ctx=ctx)), rank)
    channel = ControlChannel()
    sync = RankSync(channel, ctx, device, args.collective_timeout_s)
    size = dict(width=args.width, height=args.height, num_frames=args.num_frames, num_inference_steps=args.steps)
    rows = []
    if rank != 0:
        follow(pipe, channel, sync)
    else:
        leader = LeaderPipeline(pipe, channel, sync)
        outdir = tempfile.mkdtemp(prefix="serve_ranks_")
        manager = JobManager(leader, outdir)

        def run(name, prompt, cancel=False, **kw):
            job = manager.submit(Job(id=manager.new_id(), request=GenerationRequest(prompt=prompt, **{**size, **kw}),
                                     model="tiny", seconds="1", size=f"{args.width}x{args.height}"))
            t0 = time.time()
            while True:
                try:
                    j = manager.get(job.id)
                except KeyError:
                    j = None
                    break
                if cancel and j.progress > 0:
                    manager.delete(job.id)
                    cancel = False
                if j.status in ("completed", "failed"):
                    break
                time.sleep(0.005)
            frames = None
            if j is not None and j.status == "completed":
                import av

                with av.open(str(manager.files.video(j))) as f:
                    frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
            rows.append({"job": name, "status": j.status if j else "deleted",
                         "code": (j.error or {}).get("code") if j else None, "seconds": round(time.time() - t0, 2),
                         "memory": leader.rank_memory()})
            return frames

        ref = run("a", "a fox", seed=1)
        run("oom", "OOM", seed=1)
        rows[-1]["same_as_a"] = None
        for name, kw in (("again", {}), ("cancel", {"num_inference_steps": args.cancel_steps}), ("after", {})):
            f = run(name, "a fox" if name != "cancel" else "cancel me", cancel=name == "cancel", seed=1, **kw)
            rows[-1]["same_as_a"] = None if f is None else bool(np.array_equal(f, ref))
        manager.close()
        leader.stop()
        shutil.rmtree(outdir, ignore_errors=True)
    # the agreement's cost: every rank, 200 times
    times = []
    for _ in range(200):
        t = time.perf_counter()
        sync._agree(GO)
        times.append(time.perf_counter() - t)
    lasts = [None] * dist.get_world_size()
    dist.all_gather_object(lasts, pipe.last, group=channel.group)
    if rank == 0:
        for r in rows:
            i = [x["job"] for x in rows].index(r["job"])
            r["last_step_per_rank"] = [lasts[k][i] for k in range(len(lasts))]
        print(f"{'job':<8} {'status':<10} {'code':<14} {'s':>6}  same_as_a  last step per rank / GPU MiB per rank")
        for r in rows:
            mib = [round(a / 2**20) for a, _ in r["memory"]]
            print(f"{r['job']:<8} {r['status']:<10} {str(r['code']):<14} {r['seconds']:>6}  {str(r.get('same_as_a')):<9}  "
                  f"{r['last_step_per_rank']} / {mib}")
        ms = statistics.median(times) * 1e3
        print(f"step agreement: median {ms:.3f} ms, max {max(times) * 1e3:.3f} ms over 200 (world {dist.get_world_size()})")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                                   "args": vars(args), "jobs": rows, "agreement_ms_median": ms,
                                                   "agreement_ms_max": max(times) * 1e3}, indent=1, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
