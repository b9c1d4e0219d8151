"""The server's pipelines over one set of weights: a job per pipeline through POST /v1/videos (in
process), its wall time, and the GPU memory after it. What it should show: every job completed,
and `allocated after` flat from one pipeline to the next (the pipelines share the components: no
second copy of the weights; the distilled LoRA is fused only inside stage 2 and unfused after).

    python benchmark/serve_pipelines.py --device cuda --width 768 --height 512 --num-frames 121 \
        --json benchmark/results/serve_pipelines.json                       (tiny model, real sizes)
    python benchmark/serve_pipelines.py --device cuda --model-path /models/ltx-2 ...   (the real files)
    python benchmark/serve_pipelines.py --device cpu --width 128 --height 128 --num-frames 9   (smoke)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

PIPELINES = "LTX2LongVideo,LTX2DistilledPipeline,LTX2Pipeline,LTX2TwoStagePipeline"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-path", default=None, help="official LTX-2 files (default: the embedded tiny model)")
    p.add_argument("--pipelines", default=PIPELINES, help="comma-separated; each gets one job, in this order")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--num-frames", type=int, default=121)
    p.add_argument("--steps", type=int, default=None, help="guided pipelines (default: each one's for the model)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from fastapi.testclient import TestClient

    from ltx2_tp.serving.api import create_app
    from ltx2_tp.serving.jobs import JobManager
    from ltx2_tp.serving.pipelines import ServedPipelines

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.model_path:
        from ltx2_tp.pipelines.checkpoints import build_components

        comps = build_components(args.model_path, device=args.device, dtype=dtype)
    else:
        from ltx2_tp.pipelines.tiny import build_tiny_components

        comps = build_tiny_components(0, device=args.device, dtype=dtype)
    gib = (lambda: torch.cuda.memory_allocated() / 2**30) if args.device.startswith("cuda") else (lambda: 0.0)
    rows, weights = [], gib()
    pipes = ServedPipelines(comps, "LTX2LongVideo", "ltx-2", steps=args.steps)
    with tempfile.TemporaryDirectory() as out:
        manager = JobManager(pipes, out, idle_poll_s=0.02)
        with TestClient(create_app(manager, model_name="ltx-2", pipelines=pipes, max_video_tokens=10**7)) as http:
            for name in args.pipelines.split(","):
                body = {"prompt": "a red fox in the snow", "model": name, "width": args.width, "height": args.height,
                        "num_frames": args.num_frames, "seed": 0}
                if args.steps and pipes.pipeline_class(name).fixed_steps is None:
                    body["num_inference_steps"] = args.steps
                t0 = time.perf_counter()
                r = http.post("/v1/videos", json=body)
                if r.status_code != 200:
                    rows.append({"pipeline": name, "status": f"{r.status_code}: {r.json()['error']['message']}"})
                    continue
                vid = r.json()["id"]
                while (job := manager.get(vid)).status not in ("completed", "failed"):
                    time.sleep(0.02)
                rows.append({"pipeline": name, "status": job.status, "steps": job.request.num_inference_steps,
                             "wall_s": round(time.perf_counter() - t0, 3), "allocated_after_gib": round(gib(), 3),
                             "error": job.error})
        manager.close()
    print(f"device={args.device} {args.width}x{args.height}x{args.num_frames} weights {weights:.2f} GiB")
    print(f"{'pipeline':<28} {'status':<10} {'steps':>5} {'wall s':>8} {'allocated after GiB':>20}")
    for r in rows:
        print(f"{r['pipeline']:<28} {str(r['status'])[:60]:<10} {r.get('steps', ''):>5} {r.get('wall_s', ''):>8} "
              f"{r.get('allocated_after_gib', ''):>20}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "weights_gib": weights, "rows": rows,
                                               "size": [args.width, args.height, args.num_frames]}, indent=1))
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
