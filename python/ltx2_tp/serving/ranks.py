"""Rank orchestration: every TP/SP/guidance rank runs the same job, and they leave it together.

`run_on_rank` is how a rank runs a request (the CLI, sglang and the server use it). The server's
one worker drives every rank (torchrun, several GPUs): rank 0 runs the HTTP server and the job
queue, and its pipeline is wrapped in `LeaderPipeline`, which sends each request over a CPU
(gloo) control group to the other ranks, then runs its own share; every other rank sits in
`follow()`. All ranks enter the same jobs in the same order.

Inside a job, `RankSync` makes them leave at the same step. At every progress call of the
pipeline (each denoising step, each stage's start, the end) the ranks all-gather three numbers
over the control group: a flag (go on / cancel / failed / out of memory) and their GPU memory.
A step of the real model takes 0.1-200 s; this costs about 0.5 ms (gloo on CPU, measured by
benchmark/serve_ranks.py, which also runs the failure below on GPUs with NCCL).
- Cancel: rank 0's job was deleted. Every rank raises JobCancelled at that step; no collective of
  the DiT is open between steps, so nothing else is needed.
- A failure on any rank (out of memory, any exception): that rank releases the DiT's groups
  (abort, destroy, drop every reference, its traceback's frames included). With gloo that closes
  their connections, so a peer waiting inside a DiT collective or ring exchange the failed rank
  never joined fails at once ("Connection closed by peer") and does the same. The failed rank
  then joins the next agreement with `failed`, every rank fails the job, and all of them build
  fresh DiT groups (new store prefix), in place in the one ParallelContext the model's layers
  read, before the next job. Where closing does not reach the peer (NCCL), the peer's CPU thread
  is not blocked by a pending collective: it reaches the agreement, and aborting the NCCL groups
  there ends the kernel still waiting. DiT collectives are also bounded by `collective_timeout_s`.
Limits: a rank that dies (killed, segfault) or hangs past CONTROL_TIMEOUT_S breaks the control
group: the remaining ranks stop (ControlLost, exit status 1) and torchrun restarts them all with
`--max-restarts`; the job store then fails the running job (`server_restarted`) and keeps the
rest. With NCCL the watchdog ends the process when a collective outlasts its timeout (same
restart). In-process recovery is tested with gloo on CPU only; the NCCL path is untested.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.serving.cancel import JobCancelled
from ltx2_tp.serving.metrics import device_memory

# a rank's vote at a step; BROKEN: a collective failed under it because a peer went away (not a
# cause: the job's error names the rank that failed first, when one says so)
GO, CANCEL, BROKEN, FAILED, OUT_OF_MEMORY = 0, 1, 2, 3, 4
# the longest a rank waits for the others at a step boundary: above the longest step (200 s), a
# first compiled step (minutes) and the collective timeout
CONTROL_TIMEOUT_S = 3600
HEARTBEAT_S = 60  # an idle leader pings the followers, whose wait for a job would otherwise time out
COLLECTIVE_TIMEOUT_S = 600  # NCCL's default; a DiT collective whose peer failed ends after this
_GROUP_FIELDS = ("tp_group", "ulysses_group", "ring_group", "sp_group", "guidance_group")
_RUN, _PING, _STOP = "run", "ping", "stop"


def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def run_on_rank(pipeline, req: GenerationRequest, output_path: str | Path, rank: int, **kw):
    """Every rank runs the same request (their collectives meet) and computes the same video: rank 0
    keeps its file and gets the result; the others write beside it and delete theirs."""
    if rank == 0:
        return pipeline(req, output_path, **kw)
    side = Path(f"{output_path}.rank{rank}")
    try:
        pipeline(req, side, **kw)
    finally:
        side.unlink(missing_ok=True)
    return None


class PeerFailed(Exception):
    """Another rank failed this job; this rank stopped at the same step."""

    def __init__(self, ranks: list[int], out_of_memory: bool):
        self.code = "out_of_memory" if out_of_memory else "rank_failed"
        what = " (out of memory)" if out_of_memory else ""
        super().__init__(f"rank {', '.join(map(str, ranks))} failed{what}; its log has the error")


class ControlLost(Exception):
    """The control group failed (a rank died, or hung past CONTROL_TIMEOUT_S): the ranks can no
    longer work together, and the server stops (torchrun --max-restarts brings it back)."""

    fatal = True
    code = "rank_lost"


class ControlChannel:
    """Rank 0 -> all ranks, Python objects, over its own gloo group (works beside NCCL)."""

    def __init__(self, timeout_s: float = CONTROL_TIMEOUT_S):
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def send(self, msg) -> None:
        try:
            dist.broadcast_object_list([msg], src=0, group=self.group)
        except RuntimeError as e:
            raise ControlLost(f"control group: {e}") from e

    def receive(self):
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as e:
            raise ControlLost(f"control group: {e}") from e
        return box[0]

    def agree(self, flag: int, memory: tuple[int, int]) -> list[list[int]]:
        """Every rank's [flag, allocated, reserved]; the same list on every rank."""
        mine = torch.tensor([flag, *memory], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(rows, mine, group=self.group)
        except RuntimeError as e:
            raise ControlLost(f"control group: {e}") from e
        return [r.tolist() for r in rows]


class RankSync:
    """Runs a job on this rank in step with the others (see the module's docstring)."""

    def __init__(self, channel: ControlChannel, ctx, device, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S):
        self.channel, self.ctx, self.device = channel, ctx, device
        self.timeout = timedelta(seconds=collective_timeout_s)
        self.memory: list[tuple[int, int]] = [(0, 0)] * channel.world
        self._bound_groups()

    def run(self, pipeline, req: GenerationRequest, output_path, report=None):
        """`report(stage, done, total)` (rank 0: the job's progress) may raise JobCancelled: that
        becomes this rank's vote, and every rank stops at that step."""
        try:
            return run_on_rank(pipeline, req, output_path, self.channel.rank, progress=self._progress(report))
        except (JobCancelled, ControlLost, KeyboardInterrupt, SystemExit):
            raise
        except PeerFailed:
            self._release()
            self._rebuild()
            raise
        except BaseException as e:  # failed here: free the peers, tell them at the step they are at, rebuild
            _drop_frames(e)
            self._release()
            mine = OUT_OF_MEMORY if isinstance(e, torch.OutOfMemoryError) else BROKEN if _is_comm_error(e) else FAILED
            flags = self._agree(mine)
            self._rebuild()
            causes = [r for r, f in enumerate(flags) if f >= FAILED]
            if mine == BROKEN and causes:
                raise PeerFailed(causes, OUT_OF_MEMORY in flags) from e
            raise

    def _progress(self, report):
        def step(stage: str, done: int, total: int) -> None:
            flag = GO
            if report is not None:
                try:
                    report(stage, done, total)
                except JobCancelled:
                    flag = CANCEL
            flags = self._agree(flag)
            failed = [r for r, f in enumerate(flags) if f >= FAILED] or [r for r, f in enumerate(flags) if f == BROKEN]
            if failed:
                raise PeerFailed(failed, OUT_OF_MEMORY in flags)
            if CANCEL in flags:
                raise JobCancelled()

        return step

    def _agree(self, flag: int) -> list[int]:
        rows = self.channel.agree(flag, device_memory(self.device))
        self.memory = [(a, r) for _, a, r in rows]
        return [f for f, _, _ in rows]

    def _groups(self) -> list:
        seen = []
        for f in _GROUP_FIELDS:
            g = getattr(self.ctx, f)
            if g is not None and all(g is not s for s in seen):
                seen.append(g)
        return seen

    def _bound_groups(self) -> None:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        for g in self._groups():
            _set_pg_timeout(self.timeout, g)

    def _release(self) -> None:
        """Abort and destroy the DiT's groups and drop every reference, so they close their
        connections (gloo) or end their kernels (NCCL: ncclCommAbort)."""
        old = self._groups()
        for f in _GROUP_FIELDS:
            setattr(self.ctx, f, None)
        while old:
            _close(old.pop())
        gc.collect()

    def _rebuild(self) -> None:
        """Fresh DiT groups, in place in the shared context (every rank calls this at the same agreement)."""
        from ltx2_tp.distributed.context import build_groups

        fresh = build_groups(self.ctx.tp_size, self.ctx.ulysses_size, self.ctx.ring_size, self.ctx.guidance_size)
        for f in _GROUP_FIELDS:
            setattr(self.ctx, f, getattr(fresh, f))
        self._bound_groups()


def _is_comm_error(e: BaseException) -> bool:
    """A collective or exchange that failed because a peer left (gloo: closed connection, timeout)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "NCCL"))


def _close(group) -> None:
    for close in (group.abort, lambda: dist.destroy_process_group(group)):
        try:
            close()
        except Exception:  # noqa: BLE001 - not every backend aborts; an aborted group may refuse
            pass


def _drop_frames(e: BaseException) -> None:
    """The failed call's frames (ring exchanges, collectives) hold the groups and their pending work:
    clear their locals (the traceback keeps its text) so releasing the groups really closes them."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


class LeaderPipeline:
    """Rank 0's pipeline: tells the followers, then runs its share in step with them (same call
    signature as a pipeline)."""

    def __init__(self, pipeline, channel: ControlChannel, sync: RankSync):
        self.pipeline, self.channel, self.sync = pipeline, channel, sync
        self._last_send = time.monotonic()

    def __getattr__(self, name):  # the job manager reads e.g. pipeline.c
        return getattr(self.pipeline, name)

    def __call__(self, req: GenerationRequest, output_path, progress=None):
        # a bad request fails here, before any rank starts it: the pipeline's own checks where it has them
        check = getattr(self.pipeline, "check", None)
        if callable(check):
            check(req)
        else:
            limit = getattr(self.pipeline, "max_frames", None)  # a tiled long video takes more frames
            req.validate(**({"max_frames": limit(req)} if limit else {}))
        self._send((_RUN, asdict(req), str(output_path)))
        return self.sync.run(self.pipeline, req, output_path, report=progress)

    def rank_memory(self) -> list[tuple[int, int]]:
        return list(self.sync.memory)

    def idle(self) -> None:
        if time.monotonic() - self._last_send >= HEARTBEAT_S:
            self._send((_PING, None, None))

    def stop(self) -> None:
        self._send((_STOP, None, None))

    def _send(self, msg) -> None:
        self._last_send = time.monotonic()
        self.channel.send(msg)


def follow(pipeline, channel: ControlChannel, sync: RankSync) -> None:
    """Ranks > 0: run whatever rank 0 runs until it says stop (ControlLost ends the process)."""
    while True:
        kind, fields, path = channel.receive()
        if kind == _STOP:
            return
        if kind != _RUN:
            continue
        try:
            sync.run(pipeline, GenerationRequest(**fields), path)
        except JobCancelled:
            print(f"[rank {channel.rank}] job cancelled", flush=True)
        except ControlLost:
            raise
        except Exception as e:  # rank 0 reports the job; keep following
            print(f"[rank {channel.rank}] job failed: {type(e).__name__}: {e}", flush=True)
