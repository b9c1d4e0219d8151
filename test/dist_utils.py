"""Run a function on N CPU processes joined by gloo; results come back through files."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:  # report, don't hang the others silently
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args):
    """fn(rank, world, *args) on `world` processes; returns the list of per-rank results."""
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_worker, args=(world, free_port(), fn, args, d), nprocs=world, join=True)
        finally:
            errors = []
            for r in range(world):
                p = os.path.join(d, f"{r}.pt")
                if os.path.exists(p):
                    out = torch.load(p, weights_only=False)
                    if not out["ok"]:
                        errors.append(f"rank {r}:\n{out['error']}")
            if errors:
                raise AssertionError("\n".join(errors))
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False)["result"] for r in range(world)]
