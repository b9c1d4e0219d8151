"""The server's one worker driving every TP/SP rank (torchrun, several GPUs).

Rank 0 runs the HTTP server and the job queue; its pipeline is wrapped in `LeaderPipeline`, which
first sends each validated request over a CPU (gloo) control group to the other ranks, then runs
its own share. Every other rank sits in `follow()`: receive a request, run the same pipeline (its
collectives meet rank 0's), drop its copy of the output, wait for the next. All ranks therefore
enter the same jobs in the same order. A request that fails validation fails on rank 0 before it
is sent, so the followers never start it.
"""

from __future__ import annotations

from dataclasses import asdict

import torch.distributed as dist

from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.pipelines.two_stage import run_on_rank

_STOP = "stop"


class ControlChannel:
    """Rank 0 -> all ranks, Python objects, over its own gloo group (works beside NCCL)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")
        self.rank = dist.get_rank()

    def send(self, msg) -> None:
        dist.broadcast_object_list([msg], src=0, group=self.group)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class LeaderPipeline:
    """Rank 0's pipeline: tells the followers, then runs its share (same call signature)."""

    def __init__(self, pipeline, channel: ControlChannel):
        self.pipeline, self.channel = pipeline, channel

    def __getattr__(self, name):  # the job manager reads e.g. pipeline.c
        return getattr(self.pipeline, name)

    def __call__(self, req: GenerationRequest, output_path, progress=None):
        req.validate()  # a bad request fails here, before any rank starts it
        self.channel.send(("run", asdict(req), str(output_path)))
        return self.pipeline(req, output_path, progress=progress)

    def stop(self) -> None:
        self.channel.send((_STOP, None, None))


def follow(pipeline, channel: ControlChannel) -> None:
    """Ranks > 0: run whatever rank 0 runs until it says stop."""
    while True:
        kind, fields, path = channel.receive()
        if kind == _STOP:
            return
        try:
            run_on_rank(pipeline, GenerationRequest(**fields), path, channel.rank)
        except BaseException as e:  # rank 0 reports the job; keep following
            print(f"[rank {channel.rank}] job failed: {type(e).__name__}: {e}", flush=True)
