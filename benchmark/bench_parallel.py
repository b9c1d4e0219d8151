"""TP and SP scaling of one DiT step against one GPU, with the share of kernel time in communication.

  torchrun --nproc-per-node 2 benchmark/bench_parallel.py --cases 1920x1088x121,1920x1088x481 \
      --layouts 2x1x1,1x2x1,1x1x2 --out benchmark/results/parallel.json

A layout is TPxULYSSESxRING. The 1-GPU baseline runs on rank 0 while the others wait; every layout
uses the same seeded weights (drawn at full size, sharded by the layers' loaders), and its output is
compared with the 1-GPU output (bf16 relative max error). Communication share = NCCL kernel time /
all kernel time on rank 0 in one profiled step (torch.profiler, CUPTI); exposed = time an NCCL
kernel runs with no compute kernel beside it / time any kernel runs (what overlap is meant to cut).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_sync, case_tokens, cuda_time, peak_gib, rel, reset_peak, kernel_summary, median, step_flops,  # noqa: E402
                    summary_markdown, write_json)

from ltx2_tp.compile import compile_blocks  # noqa: E402
from ltx2_tp.distributed.context import ParallelContext, build_groups  # noqa: E402
from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.models.ltx2.weights import build_model  # noqa: E402
from ltx2_tp.step_inputs import synthetic_step_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--cases", default="1920x1088x121")
    ap.add_argument("--layouts", default="2x1x1,1x2x1,1x1x2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--profile-cases", default="1920x1088x121")
    ap.add_argument("--profile-dir", default="profiles")
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--overlap", default="on", choices=["on", "off", "both"],
                    help="communication overlap (TP all-reduce per token chunk, Ulysses head groups); "
                         "both: time every layout with and without")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (1 GPU and every layout)")
    args = ap.parse_args()

    gpu = torch.cuda.is_available()  # CPU + gloo only to smoke-test this script (--model tiny)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dev = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    layouts = [tuple(int(x) for x in s.split("x")) for s in args.layouts.split(",")]
    # groups for every layout are created up front, on all ranks, in the same order
    ctxs = {lay: build_groups(*lay) for lay in layouts}
    devname = torch.cuda.get_device_name() if gpu else "cpu"
    stamp = f"{devname} x{world} | {datetime.date.today()} | torch {torch.__version__}"
    cmd = f"torchrun --nproc-per-node {world} " + " ".join(sys.argv)
    res = {"device": f"{devname} x{world}", "date": str(datetime.date.today()),
           "command": cmd, "torch": torch.__version__, "compiled": args.compile, "cases": {}}

    for case in args.cases.split(","):
        w, h, f = (int(x) for x in case.split("x"))
        video, audio = synthetic_step_inputs(cfg, f, h, w, 24.0, dev, torch.bfloat16, seed=1)
        tokens, audio_tokens = case_tokens(w, h, f)
        r = res["cases"].setdefault(case, {"tokens": tokens, "flops": step_flops(cfg, tokens, audio_tokens)})
        profile = case in args.profile_cases.split(",")
        ref = None
        if rank == 0:  # 1-GPU baseline
            model = build_model(cfg, ParallelContext(), device=dev, dtype=torch.bfloat16, seed=0)
            plan = model.execution_plan(tokens)
            if args.compile:
                compile_blocks(model)
                model(video, audio, plan=plan)  # compile outside the clock
            reset_peak()
            r["1gpu_s"] = median(cuda_time(lambda: model(video, audio, plan=plan), 1, args.repeat))
            r["1gpu_peak_gib"] = peak_gib()
            ref = [t.cpu() for t in model(video, audio, plan=plan)]
            print(f"{case} 1 GPU: {r['1gpu_s']:.3f} s/step [{plan.describe()}]", flush=True)
            del model
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
        dist.barrier()
        variants = {"on": [True], "off": [False], "both": [True, False]}[args.overlap]
        for lay, overlap in [(lay, o) for lay in layouts for o in variants]:
            ctx = ctxs[lay]
            name = "tp{}_u{}_r{}".format(*lay) + ("" if overlap else "_nooverlap")
            model = build_model(cfg, ctx, device=dev, dtype=torch.bfloat16, seed=0)
            plan = model.execution_plan(tokens)  # for the tokens this rank holds
            if not overlap:
                plan = dataclasses.replace(plan, comm_chunk_tokens=None, ulysses_head_groups=1)
            if args.compile:
                compile_blocks(model)
                model(video, audio, plan=plan)
            reset_peak()
            t = median(cuda_time(lambda: model(video, audio, plan=plan), 1, args.repeat))
            out = model(video, audio, plan=plan)
            peak = peak_gib()
            entry = {"s": t, "peak_gib_rank0": peak, "plan": plan.describe()}
            if rank == 0:
                entry["speedup_vs_1gpu"] = r["1gpu_s"] / t
                entry["rel_err_video_vs_1gpu"] = rel(out[0], ref[0])
                entry["rel_err_audio_vs_1gpu"] = rel(out[1], ref[1])
            if profile:
                from torch.profiler import ProfilerActivity, profile as prof_ctx

                _sync()
                with prof_ctx(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
                    model(video, audio, plan=plan)
                    _sync()
                s = kernel_summary(prof)
                entry["comm_share"] = s["groups"].get("communication", (0.0, 0.0))[1]
                entry["exposed_comm_share"] = s["exposed_comm_share"]
                if rank == 0:
                    p = Path(args.profile_dir) / f"parallel_{name}{'_compiled' if args.compile else ''}_{case}.md"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_text(summary_markdown(f"ltx2_tp {name}, one DiT step {case}, rank 0",
                                                  f"torch.profiler (CUPTI) | {stamp} | `{cmd}`", s))
            if rank == 0:
                r[name] = entry
                print(f"{case} {name}: {t:.3f} s/step x{entry['speedup_vs_1gpu']:.2f} "
                      f"comm {entry.get('comm_share', float('nan')):.1%} "
                      f"(exposed {entry.get('exposed_comm_share', float('nan')):.1%}) peak {peak:.1f} GiB "
                      f"err v {entry['rel_err_video_vs_1gpu']:.1e} a {entry['rel_err_audio_vs_1gpu']:.1e} "
                      f"[{entry['plan']}]", flush=True)
            del model, out
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
            dist.barrier()
    if rank == 0:
        print(f"\n{stamp}\n| case | tokens | 1 GPU s | layout | s | speed-up | comm share | exposed comm | TFLOP/s per GPU |")
        for case, r in res["cases"].items():
            for name, e in r.items():
                if isinstance(e, dict):
                    tf = r["flops"] / e["s"] / 1e12 / world
                    print(f"| {case} | {r['tokens']} | {r['1gpu_s']:.3f} | {name} | {e['s']:.3f} | "
                          f"{e['speedup_vs_1gpu']:.2f}x | {e.get('comm_share', float('nan')):.1%} | "
                          f"{e.get('exposed_comm_share', float('nan')):.1%} | {tf:.0f} |")
        if args.out:
            write_json(args.out, res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
