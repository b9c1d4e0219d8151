"""One DiT step for Nsight Compute: warm up, then one step between cudaProfilerStart/Stop, so
`ncu --profile-from-start off` sees only the measured kernels (see benchmark/profile_ncu.sh).

A few blocks suffice: every block launches the same kernels at the same shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ltx2_tp.layers.fp8 import quantize_fp8  # noqa: E402
from ltx2_tp.memory.plan import ExecutionPlan  # noqa: E402
from ltx2_tp.models.ltx2.config import get_config  # noqa: E402
from ltx2_tp.models.ltx2.weights import build_model  # noqa: E402
from ltx2_tp.step_inputs import synthetic_step_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ltx-2-19b")
    ap.add_argument("--case", default="1920x1088x121")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--plan", default="auto", choices=["auto", "none"])
    args = ap.parse_args()
    w, h, f = (int(x) for x in args.case.split("x"))
    cfg = get_config(args.model).replace(num_layers=args.layers)
    dev = torch.device("cuda")
    video, audio = synthetic_step_inputs(cfg, f, h, w, 24.0, dev, torch.bfloat16, seed=1)
    model = build_model(cfg, device=dev, dtype=torch.bfloat16, seed=0)
    plan = model.execution_plan(video.latent.shape[1]) if args.plan == "auto" else ExecutionPlan()
    if args.fp8:
        quantize_fp8(model)
    with torch.no_grad():
        for _ in range(2):
            model(video, audio, plan=plan)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        model(video, audio, plan=plan)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled one step of {args.layers} blocks at {args.case} ({video.latent.shape[1]} video tokens)")


if __name__ == "__main__":
    main()
