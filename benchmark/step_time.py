"""One DiT step of a given source tree, eager and compiled: for before/after comparisons of a change.

  python benchmark/step_time.py --tree /path/to/checkout_before --out before.json --save-output before.pt
  python benchmark/step_time.py --tree .                        --out after.json  --compare before.pt

`--tree` picks the checkout whose `python/ltx2_tp` is timed (default: this one); the script uses
only what every version has (build_model, forward, compile_blocks, synthetic_step_inputs), and
does not build ltx-core, so two trees run back to back on one GPU in a few minutes. Random
weights (seed 0), bf16, the model's own plan. `--compare` prints the relative max error of this
tree's outputs against another run's `--save-output`. CPU (--model tiny) only to smoke-test it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--case", default="1920x1088x121", help="WIDTHxHEIGHTxFRAMES")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--fp8", action="store_true", help="quantize the block linears first (layers/fp8.py)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON with the timings")
    ap.add_argument("--save-output", default=None, help="save this tree's (video, audio) outputs (.pt)")
    ap.add_argument("--compare", default=None, help="a --save-output file of another run to compare against")
    args = ap.parse_args()

    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree / "python"))
    import torch

    from ltx2_tp.compile import compile_blocks
    from ltx2_tp.models.ltx2.config import get_config
    from ltx2_tp.models.ltx2.weights import build_model
    from ltx2_tp.step_inputs import synthetic_step_inputs

    import ltx2_tp
    assert Path(ltx2_tp.__file__).resolve().is_relative_to(tree), f"ltx2_tp came from {ltx2_tp.__file__}, not {tree}"
    rev = "-"  # a tree without its own .git (e.g. `git archive` output) would report the enclosing repo's HEAD
    if (tree / ".git").exists():
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    dev = torch.device(args.device)
    w, h, f = (int(x) for x in args.case.lower().split("x"))
    cfg = get_config(args.model)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    model = build_model(cfg, device=dev, dtype=torch.bfloat16, seed=0)
    if args.fp8:
        from ltx2_tp.layers.fp8 import quantize_fp8

        quantize_fp8(model)
    video, audio = synthetic_step_inputs(cfg, f, h, w, 24.0, dev, torch.bfloat16, seed=1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(warmup: int) -> list[float]:
        for _ in range(warmup):
            model(video, audio)
        out = []
        for _ in range(args.repeat):
            sync()
            t0 = time.perf_counter()
            model(video, audio)
            sync()
            out.append(time.perf_counter() - t0)
        return out

    res = {"tree": str(tree), "rev": rev, "model": args.model, "case": args.case, "fp8": args.fp8,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "video_tokens": video.latent.shape[1]}
    res["eager_s"] = timed(1)
    outputs = [t.float().cpu() for t in model(video, audio)]
    if not args.no_compile:
        compile_blocks(model)
        res["compiled_s"] = timed(2)
    if dev.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.save_output:
        torch.save(outputs, args.save_output)
    if args.compare:
        other = torch.load(args.compare)
        res["rel_err_vs_compare"] = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(outputs, other)]

    print(f"| tree | rev | case | tokens | eager s/step | compiled s/step | rel err video/audio vs --compare |")
    med = {k: statistics.median(res[k]) for k in ("eager_s", "compiled_s") if k in res}
    err = "/".join(f"{e:.1e}" for e in res.get("rel_err_vs_compare", [])) or "-"
    print(f"| {tree.name} | {rev} | {args.case} | {res['video_tokens']} | {med['eager_s']:.3f} | "
          f"{med.get('compiled_s', float('nan')):.3f} | {err} |")
    if args.out:
        Path(args.out).write_text(json.dumps({**res, "median": med}, indent=2))


if __name__ == "__main__":
    main()
