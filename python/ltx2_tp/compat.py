"""Import ltx-core / ltx-pipelines where torchaudio cannot be installed.

ltx-core imports torchaudio at module level, but uses it only in its audio *encoder* (mel
spectrogram and resampling of an input waveform). PyPI's torchaudio pins its own torch, and its
compiled extension does not load against other torch releases (seen with torch 2.13 CPU), so when
the real package is missing a placeholder module is registered: decoding (latents -> mel ->
vocoder) works, and touching torchaudio raises an ImportError that says why.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


class _Unavailable:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        raise ImportError(f"torchaudio.{self._name}.{attr} is needed here (ltx-core's audio encoder) but "
                          "torchaudio is not installed for this torch; install a torchaudio matching your torch")


def ensure_ltx_imports() -> None:
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return
    mod = types.ModuleType("torchaudio")
    mod.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    mod.transforms = _Unavailable("transforms")
    mod.functional = _Unavailable("functional")
    mod.ltx2_tp_placeholder = True
    sys.modules["torchaudio"] = mod


def has_torchaudio() -> bool:
    """Whether ltx-core's audio *encoder* can run (its mel spectrogram is torchaudio's)."""
    ensure_ltx_imports()
    import torchaudio

    try:
        torchaudio.transforms.MelSpectrogram  # noqa: B018
    except ImportError:
        return False
    return True
