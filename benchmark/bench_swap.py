"""Block swap: one DiT step with blocks streamed from pinned host memory vs all blocks resident.

  python benchmark/bench_swap.py --cases 1920x1088x121 --resident 0,24s --fp8 \
      --out benchmark/results/bench_swap_h100.json

--resident lists the layouts to time: K keeps the first K blocks resident, Ks spreads K resident
blocks evenly (memory/swap.py spread_blocks), 0 streams every block. Ours only (seeded random
weights, no ltx-core), bf16 and with --fp8 quantize_fp8's linears. Per case and layout: s/step
(median), the ratio to the resident step (the issue's target at 1920x1088x121 with every block
streamed: <= 1.15x), peak GiB, the blocks' device bytes, and whether the output equals the
resident output bit for bit (the same kernels read the same bytes, so it must).

--build-streamed builds each layout with build_swapped_model (streamed blocks never on the GPU:
what a memory cap needs; no resident reference then, outputs are compared across layouts), and
--memory-fraction F caps the process (torch.cuda.set_per_process_memory_fraction), e.g. 0.3 of an
80 GB H100 = 24 GiB. Also reported: one block's host->device copy at its size (pinned by
cudaHostRegister, and pageable) against the per-block compute time of the resident step.
CPU smoke test: --model tiny --device cpu --cases 256x256x9.
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
from common import _sync, cuda_time, median, peak_gib, reset_peak, write_json  # noqa: E402

from ltx2_tp.compile import compile_blocks  # noqa: E402
from ltx2_tp.layers.fp8 import quantize_fp8  # noqa: E402
from ltx2_tp.memory.plan import plan_for  # noqa: E402
from ltx2_tp.memory.swap import (HostBuffer, block_nbytes, build_swapped_model, device_nbytes,  # noqa: E402
                                 disable_block_swap, enable_block_swap, spread_blocks)
from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.models.ltx2.model import LTX2Model  # noqa: E402
from ltx2_tp.models.ltx2.weights import build_model  # noqa: E402
from ltx2_tp.pipelines.planning import cap_fraction  # noqa: E402
from ltx2_tp.step_inputs import synthetic_step_inputs  # noqa: E402


def parse_case(s: str):
    w, h, f = (int(x) for x in s.lower().split("x"))
    return w, h, f


def layout(spec: str, n: int):
    """'24' -> 24 (the first 24 blocks), '24s' -> 24 spread evenly."""
    return spread_blocks(int(spec[:-1]), n) if spec.endswith("s") else int(spec)


def copy_rates(nbytes: int, device: torch.device, repeat: int = 5) -> dict:
    """GB/s of one block-sized host->device copy, from registered (pinned) and pageable memory."""
    if device.type != "cuda":
        return {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, src in (("pinned", HostBuffer(nbytes, pin=True).tensor), ("pageable", torch.empty(nbytes, dtype=torch.uint8))):
        src.fill_(1)
        dst.copy_(src, non_blocking=True)
        _sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            dst.copy_(src, non_blocking=True)
        _sync()
        out[f"{name}_gb_s"] = nbytes * repeat / (time.perf_counter() - t0) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--cases", default="1920x1088x121")
    ap.add_argument("--resident", default="0", help="comma list of layouts: K (first K resident), Ks (K spread), 0 (all streamed)")
    ap.add_argument("--fp8", action="store_true", help="also time with quantize_fp8's linears (what streams is fp8)")
    ap.add_argument("--fp8-only", action="store_true", help="only the fp8 runs")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--build-streamed", action="store_true",
                    help="build each layout with build_swapped_model (streamed blocks never on the GPU); no resident run")
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (quick checks)")
    ap.add_argument("--device", default="cuda", help="cpu only for smoke tests of this script (with --model tiny)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dev = torch.device(args.device)
    if args.memory_fraction is not None and dev.type == "cuda":
        cap_fraction(args.memory_fraction, dev)
    dtype = torch.bfloat16
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    n = cfg.num_layers
    cases = [parse_case(c) for c in args.cases.split(",")]
    layouts = [(spec, layout(spec, n)) for spec in args.resident.split(",")]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    cap = (f", capped at {args.memory_fraction} x {torch.cuda.get_device_properties(dev).total_memory / 2**30:.1f} GiB"
           if args.memory_fraction and dev.type == "cuda" else "")
    stamp = f"{name}{cap} | {datetime.date.today()} | torch {torch.__version__}"
    results = {"device": name, "date": str(datetime.date.today()), "command": "python " + " ".join(sys.argv),
               "torch": torch.__version__, "model": args.model, "layers": n, "memory_fraction": args.memory_fraction,
               "runs": []}
    precisions = (["fp8"] if args.fp8_only else ["bf16"] + (["fp8"] if args.fp8 else []))

    def inputs(w, h, f):
        return synthetic_step_inputs(cfg, f, h, w, 24.0, dev, dtype, seed=1)

    def time_cases(model, precision, spec, swap, resident_out):
        for w, h, f in cases:
            v, a = inputs(w, h, f)
            model.plan = plan_for(v.latent.shape[1], cfg.inner_dim)
            reset_peak()
            times = cuda_time(lambda: model(v, a), 2 if args.compile else 1, args.repeat)
            out = [t.cpu() for t in model(v, a)]
            key = f"{w}x{h}x{f}"
            r = {"case": key, "tokens": v.latent.shape[1], "precision": precision, "layout": spec,
                 "s_per_step": median(times), "peak_gib": peak_gib(), "compiled": args.compile,
                 "streamed_blocks": len(swap.streamed) if swap else 0,
                 "block_gib": (swap.block_nbytes if swap else block_nbytes(model.transformer_blocks[0])) / 2**30,
                 "blocks_device_gib": (swap.device_nbytes if swap else device_nbytes(model, n)) / 2**30}
            ref = resident_out.setdefault((precision, key), out)
            r["bit_equal_to_reference"] = all(torch.equal(o, q) for o, q in zip(out, ref))
            results["runs"].append(r)
            print(f"{precision} {key} [{spec if swap else 'resident'}]: {r['s_per_step']:.3f} s/step, peak "
                  f"{r['peak_gib']:.1f} GiB, blocks on device {r['blocks_device_gib']:.1f} GiB, "
                  f"bit-equal {r['bit_equal_to_reference']}", flush=True)
            del v, a

    resident_out: dict = {}
    for precision in precisions:
        if args.build_streamed:
            for spec, resident in layouts:
                model = build_swapped_model(cfg, device=dev, dtype=dtype, seed=0, resident_blocks=resident,
                                            fp8=precision == "fp8")
                if args.compile:
                    compile_blocks(model)
                time_cases(model, precision, spec, model.residency, resident_out)
                del model
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            continue
        if precision == "bf16" or args.fp8_only:
            model = build_model(cfg, device=dev, dtype=dtype, seed=0)
            if args.compile:
                compile_blocks(model)
        if precision == "fp8":
            quantize_fp8(model)
        time_cases(model, precision, "resident", None, resident_out)
        for spec, resident in layouts:
            swap = enable_block_swap(model, resident)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            time_cases(model, precision, spec, swap, resident_out)
            disable_block_swap(model)

    model = None
    gc.collect()
    for precision in precisions:
        with torch.device("meta"):
            meta = LTX2Model(cfg).to(dtype)
        if precision == "fp8":
            quantize_fp8(meta)
        nbytes = block_nbytes(meta.transformer_blocks[0])
        results[f"block_bytes_{precision}"] = nbytes
        results[f"copy_{precision}"] = copy_rates(nbytes, dev)

    # ---- table -----------------------------------------------------------------------------
    print(f"\n{stamp}")
    for precision in precisions:
        nbytes, rates = results[f"block_bytes_{precision}"], results[f"copy_{precision}"]
        line = f"{precision}: one block streams {nbytes / 1e9:.3f} GB"
        if rates:
            line += (f" = {nbytes / rates['pinned_gb_s'] * 1e3:.1f} ms pinned ({rates['pinned_gb_s']:.1f} GB/s), "
                     f"{nbytes / rates['pageable_gb_s'] * 1e3:.1f} ms pageable ({rates['pageable_gb_s']:.1f} GB/s)")
        print(line)
    print("| precision | case | layout | streamed blocks | s/step | vs resident | ms/block (resident) | peak GiB | "
          "blocks on device GiB | bit-equal |\n|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["precision"], r["case"]): r["s_per_step"] for r in results["runs"] if r["layout"] == "resident"}
    for r in results["runs"]:
        b = base.get((r["precision"], r["case"]))
        r["vs_resident"] = r["s_per_step"] / b if b else None
        print(f"| {r['precision']} | {r['case']} | {r['layout']} | {r['streamed_blocks']} | {r['s_per_step']:.3f} | "
              f"{(r['vs_resident'] or float('nan')):.3f}x | {(b or float('nan')) / n * 1e3:.1f} | {r['peak_gib']:.1f} | "
              f"{r['blocks_device_gib']:.2f} | {r['bit_equal_to_reference']} |")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
