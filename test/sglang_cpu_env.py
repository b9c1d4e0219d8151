"""A side environment in which sglang 0.5.23 imports and runs on a CPU-only machine.

sglang pins torch 2.14.1 and CUDA-only wheels; installed with its dependencies it would replace
this machine's CPU torch. So: `pip install --no-deps --target DIR` of sglang plus exactly the
pure-Python packages its diffusion runtime imports (found by importing until nothing was missing,
../shared/sglang.md), used through PYTHONPATH by subprocesses only; the main environment is left
untouched. PyPI's torchvision is a CUDA build whose compiled ops do not load beside CPU torch;
sitecustomize.py declares the two operator schemas its import-time registrations need, so its
pure-Python transforms (imported by sglang at module level, never called here) import.

    python test/sglang_cpu_env.py [DIR]     # build it (about a minute; cached in DIR)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SGLANG = "sglang==0.5.23"
PACKAGES = [
    SGLANG, "triton==3.9.0", "torchvision==0.28.0", "apache-tvm-ffi==0.1.11", "psutil==7.2.2", "pybase64==1.5.1",
    "msgspec==0.22.0", "pyzmq==27.3.0", "aiohttp==3.14.5", "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0",
    "attrs==26.1.0", "frozenlist==1.8.0", "multidict==7.2.1", "propcache==0.5.4", "yarl==1.25.1", "idna==3.20",
    "dill==0.4.1", "sentencepiece==0.2.3", "compressed-tensors==0.20.0", "loguru==0.7.3", "gguf==0.19.0",
    "imageio==2.38.1", "imageio-ffmpeg==0.8.1", "diffusers==0.42.1", "addict==2.4.0", "cache-dit==1.5.3",
    "partial-json-parser==0.2.1.1.post7", "setproctitle==1.3.8",
]
SITECUSTOMIZE = '''\
# torchvision (PyPI, CUDA build) beside CPU torch: declare the ops its meta registrations look up.
import torch
_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
'''
DEFAULT_DIR = Path(os.environ.get("LTX2_TP_SGLANG_ENV", Path.home() / ".cache" / "ltx2_tp" / "sglang-0.5.23-cpu"))


def ensure(target: Path = DEFAULT_DIR) -> dict[str, str]:
    """Build (once) and return the environment variables that put sglang on the path."""
    target = Path(target)
    done = target / ".complete"
    if not done.exists():
        pkgs, shim = target / "site", target / "shim"
        pkgs.mkdir(parents=True, exist_ok=True)
        shim.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                        str(pkgs), *PACKAGES], check=True)
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        done.write_text("\n".join(PACKAGES))
    env = dict(os.environ)
    path = [str(target / "shim"), str(target / "site")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


if __name__ == "__main__":
    env = ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
    print("PYTHONPATH=" + env["PYTHONPATH"])
