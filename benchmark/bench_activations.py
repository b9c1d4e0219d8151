"""Activation memory of one DiT step per plan: measured peak against memory/estimate.py's formula.

  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmark/bench_activations.py \
      --cases 1920x1088x1441 --layers 4 --plans two:32768,res:32768,kv:32768,parked:32768,auto:6 \
      --out benchmark/results/bench_activations_h100.json

Builds ours only (no ltx-core: a cap then measures our peak), seeded random weights, bf16, the
synthetic step inputs (256 text tokens, one timestep per sample). Blocks beyond --resident-blocks
stream from pinned host memory (build_swapped_model), so long cases fit a --memory-fraction cap.
Per case and plan: the activation peak (max_memory_allocated during the step minus what was
allocated before it: weights, block-swap slots, inputs), the formula's prediction for the same plan
and its ratio, the reserved peak (what a cap limits), s/step, and the output against the first
plan's (the tiers must agree: `res` bit for bit with `two`, `kv`/`parked` up to the fp32
log-sum-exp merge of K/V blocks: this also checks the side-stream ordering of the copies).

Plans: `one` (one pass, whole sequence), `legacy` (plan_for: LTX2LongVideo's 2 GiB rule),
`two:C` (two-pass attention in chunks of C queries, FFN in C/2), `res:C` (and the residual parked in
host memory), `kv:C[:B]` (K/V parked, streamed in blocks of B keys, default 65536), `parked:C[:B]`
(both), `auto:G` (PlanRule(activation_budget_bytes=G GiB): plan_within's choice).
CPU smoke test: --model tiny --device cpu --cases 256x256x9 --plans two:64,res:64,kv:64:32,parked:64:32,auto:0.001
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _sync, median, rel, write_json  # noqa: E402

from ltx2_tp.compile import compile_blocks  # noqa: E402
from ltx2_tp.latent_grid import tokens_per_rank  # noqa: E402
from ltx2_tp.memory.estimate import StepShape, estimate_activations  # noqa: E402
from ltx2_tp.memory.plan import ExecutionPlan, plan_for, plan_within  # noqa: E402
from ltx2_tp.memory.swap import build_swapped_model  # noqa: E402
from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.pipelines.planning import cap_fraction  # noqa: E402
from ltx2_tp.step_inputs import synthetic_step_inputs  # noqa: E402

GIB = 2**30


def parse_plan(spec: str, cfg, shape: StepShape) -> ExecutionPlan:
    kind, *args = spec.split(":")
    if kind == "one":
        return ExecutionPlan()
    if kind == "legacy":
        return plan_for(shape.video_tokens, cfg.inner_dim)
    if kind == "auto":
        return plan_within(cfg, shape, float(args[0]) * GIB)[0]
    c = int(args[0])
    block = int(args[1]) if len(args) > 1 else 65536
    base = dict(attn_chunk_tokens=c, ffn_chunk_tokens=max(c // 2, 1), cache_rope=False)
    tiers = {"two": {}, "res": {"residual_offload": True}, "kv": {"kv_offload": True, "kv_block_tokens": block},
             "parked": {"kv_offload": True, "residual_offload": True, "kv_block_tokens": block}}
    if kind not in tiers:
        raise ValueError(f"unknown plan {spec!r}")
    return ExecutionPlan(**base, **tiers[kind])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--cases", default="1920x1088x1441", help="WIDTHxHEIGHTxFRAMES, comma-separated")
    ap.add_argument("--plans", default="two:32768,kv:32768,parked:32768")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (the activation peak does not depend on it)")
    ap.add_argument("--resident-blocks", type=int, default=None, help="blocks kept on the GPU; the others stream "
                    "(default: all resident)")
    ap.add_argument("--memory-fraction", type=float, default=None, help="torch.cuda.set_per_process_memory_fraction")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (timing)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.memory_fraction is not None and cuda:
        cap_fraction(args.memory_fraction, dev)
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    resident = cfg.num_layers if args.resident_blocks is None else args.resident_blocks
    model = build_swapped_model(cfg, device=dev, dtype=torch.bfloat16, seed=0, resident_blocks=resident)
    if args.compile:
        compile_blocks(model)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    total = torch.cuda.get_device_properties(dev).total_memory / GIB if cuda else 0.0
    results = {"device": name, "date": str(datetime.date.today()), "command": "python " + " ".join(sys.argv),
               "torch": torch.__version__, "model": args.model, "layers": cfg.num_layers, "resident_blocks": resident,
               "memory_fraction": args.memory_fraction, "total_gib": total,
               "weights_gib": torch.cuda.memory_allocated(dev) / GIB if cuda else 0.0, "runs": []}
    print(f"{name} | {results['date']} | torch {torch.__version__} | {cfg.num_layers} blocks, {resident} resident"
          + (f" | cap {args.memory_fraction} x {total:.1f} GiB" if args.memory_fraction and cuda else ""), flush=True)

    for case in args.cases.split(","):
        w, h, f = (int(x) for x in case.lower().split("x"))
        v, a = synthetic_step_inputs(cfg, f, h, w, 24.0, dev, torch.bfloat16, seed=1)
        shape = StepShape(tokens_per_rank(v.latent.shape[1], 1), a.latent.shape[1] if a is not None else 0,
                          v.context.shape[1], 1, per_token_timesteps=False, dtype_bytes=2)
        ref = None
        for spec in args.plans.split(","):
            plan = parse_plan(spec, cfg, shape)
            est = estimate_activations(cfg, plan, shape)
            r = {"case": case, "video_tokens": shape.video_tokens, "plan": spec, "describe": plan.describe(),
                 "predicted_gib": est.peak / GIB, "predicted_phase": est.peak_phase}
            try:
                for _ in range(args.warmup):
                    model(v, a, plan=plan)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev) if cuda else 0
                times = []
                for _ in range(args.repeat):
                    _sync()
                    t0 = time.perf_counter()
                    out = model(v, a, plan=plan)
                    _sync()
                    times.append(time.perf_counter() - t0)
                if cuda:
                    r["activation_gib"] = (torch.cuda.max_memory_allocated(dev) - before) / GIB
                    r["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
                    r["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / GIB
                    r["predicted_over_measured"] = r["predicted_gib"] / r["activation_gib"]
                r["s_per_step"] = median(times)
                out = [o.float().cpu() for o in out if o is not None]
                if ref is None:
                    ref = (spec, out)
                r["vs"] = ref[0]
                r["rel_err_vs_first"] = max(rel(o, q) for o, q in zip(out, ref[1]))
                r["bit_equal_to_first"] = all(torch.equal(o, q) for o, q in zip(out, ref[1]))
            except torch.cuda.OutOfMemoryError as e:
                r["error"] = f"OOM: {str(e).splitlines()[0]}"
            results["runs"].append(r)
            print(r, flush=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        del v, a

    print("\n| case | plan | predicted GiB (phase) | measured activation GiB | pred/meas | peak reserved GiB | "
          "s/step | rel err vs first | bit-equal |\n|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "error" in r:
            print(f"| {r['case']} | {r['plan']} | {r['predicted_gib']:.2f} ({r['predicted_phase']}) | {r['error']} |")
            continue
        print(f"| {r['case']} | {r['plan']} | {r['predicted_gib']:.2f} ({r['predicted_phase']}) | "
              f"{r.get('activation_gib', float('nan')):.2f} | {r.get('predicted_over_measured', float('nan')):.3f} | "
              f"{r.get('peak_reserved_gib', float('nan')):.1f} | {r['s_per_step']:.2f} | {r['rel_err_vs_first']:.1e} | "
              f"{r['bit_equal_to_first']} |")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
