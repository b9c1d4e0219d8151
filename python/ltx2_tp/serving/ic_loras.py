"""The IC-LoRA files a server offers (`serve --ic-lora NAME=PATH`, repeatable): a request names one
(`ic_lora`, with `ic_lora_strength`) and never sends weights (they are GBs).

A job of LTX2ICLoraPipeline gets the named LoRA at the request's strength exactly as `ltx2-tp
generate --lora PATH STRENGTH` gives it (the same LoraWeights tensors, the same
reference_downscale_factor from the file's metadata); the pipeline fuses it into the shared
transformer for its stage 1 and puts the exact original weights back (models/ltx2/lora.py), so the
next job, with another LoRA or none, starts from the same weights. The last LoRA read stays in host
memory (consecutive jobs with it do not read the file again); another name replaces it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from ltx2_tp.pipelines.request import RequestError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STRENGTH_RANGE = (-10.0, 10.0)  # a LoRA's multiplier; past 10 is a typo (ltx-pipelines' default: 1)


class ICLoras:
    def __init__(self, files: dict[str, str] | None = None):
        self.files = dict(files or {})  # name -> path
        self._loaded: tuple[str, object] | None = None  # (name, LoraWeights at strength 1)
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, specs: list[str] | None) -> "ICLoras":
        """["depth=/loras/depth.safetensors", ...] -> ICLoras; ValueError naming the bad one (serve checks
        them before anything is built: a name, an existing safetensors file with lora_A / lora_B pairs)."""
        files: dict[str, str] = {}
        for spec in specs or []:
            name, sep, path = spec.partition("=")
            if not sep or not NAME_RE.match(name):
                raise ValueError(f"expected NAME=PATH with NAME of letters, digits, '.', '_', '-' (at most 64), "
                                 f"got {spec!r}")
            if name in files:
                raise ValueError(f"{name!r} is given twice")
            if not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path!r}")
            _check_lora_file(name, path)
            files[name] = path
        return cls(files)

    def names(self) -> list[str]:
        return sorted(self.files)

    # ---- a request -------------------------------------------------------------------------
    def check(self, name: str | None) -> None:
        """RequestError naming ic_lora when `name` is not one of this server's."""
        if name is not None and name not in self.files:
            offered = ", ".join(self.names()) or "none (serve --ic-lora NAME=PATH adds one)"
            raise RequestError("ic_lora", f"unknown IC-LoRA {name!r}; this server has: {offered}")

    @staticmethod
    def of(req) -> tuple[str | None, float]:
        """(name, strength) a request carries (none: no IC-LoRA, as `generate` without --lora)."""
        return req.extra.get("ic_lora"), float(req.extra.get("ic_lora_strength", 1.0))

    def reference_downscale_factor(self, name: str | None) -> int:
        """The factor `generate` reads from the file (ltx-pipelines' helper; 1 without one)."""
        if name is None:
            return 1
        from ltx2_tp.compat import ensure_ltx_imports

        ensure_ltx_imports()
        from ltx_pipelines.ic_lora import _read_lora_reference_downscale_factor

        return _read_lora_reference_downscale_factor(self.files[name])

    def bind(self, pipe, req) -> None:
        """Give `pipe` (LTX2ICLoraPipeline) the request's LoRA for this job: what its constructor sets
        from `lora_path` / `lora_strength` (the file read once while it stays the last one used)."""
        from ltx2_tp.models.ltx2.lora import LoraWeights

        name, strength = self.of(req)
        self.check(name)
        pipe.lora, pipe.reference_downscale_factor = None, self.reference_downscale_factor(name)
        if name is None:
            return
        with self._lock:
            if self._loaded is None or self._loaded[0] != name:
                self._loaded = None  # free the previous one before reading the next
                self._loaded = (name, LoraWeights.from_file(self.files[name]))
            pipe.lora = LoraWeights(self._loaded[1].pairs, strength)


def takes_lora(cls) -> bool:
    """Whether a pipeline class takes an IC-LoRA (its constructor's `lora_path`, as the CLI's --lora)."""
    import inspect

    return "lora_path" in inspect.signature(cls.__init__).parameters


def _check_lora_file(name: str, path: str) -> None:
    """The header only (no tensor is read): a safetensors file with at least one lora_A / lora_B pair."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{name}: {path!r} is not a safetensors file ({e})") from None
    if not any(k.endswith(".lora_A.weight") and k[: -len("lora_A.weight")] + "lora_B.weight" in keys for k in keys):
        raise ValueError(f"{name}: {path!r} has no lora_A / lora_B weight pairs (not a LoRA file)")
