"""Step caching in the manner of TeaCache: an opt-in APPROXIMATION of the denoising loop (request
field `step_cache_threshold`, T; 0 = off, the loop unchanged).

Before each step the loop measures how much the DiT's input moved: the relative L1 change, since the
previous step, of block 0's timestep-modulated input (rms_norm(patchify(latent)) * (1 + scale) +
shift: what its self-attention reads; video and audio, the larger), computed in token chunks from
the small (tokens x 128) latents of the two steps. The changes add up over the steps in a row that
are skipped; while that sum stays below T the step reuses the previous step's denoised output
(every DiT pass of the step is skipped), otherwise the step runs and the sum restarts at 0. The
first 20% of the steps (MagCache's retention ratio) and the last step always run.

Reusing the denoised output (x0) is reusing the velocity: after an Euler step with velocity v from
x0 = x - sigma v, (x' - x0) / sigma' = v. TeaCache rescales the change by a polynomial fitted on
LTX-Video, which does not carry over to LTX-2: here it is the raw change, so a user's T is found
with benchmark/quality.py on the real weights. All ranks of the DiT take the same decision (the
indicator is all-reduced, max, over the TP and SP groups).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ltx2_tp.distributed.collectives import all_reduce_max
from ltx2_tp.layers.adaln import TokenModulation, ada_values
from ltx2_tp.layers.norm import rms_norm
from ltx2_tp.memory.plan import token_chunks

RETAIN_FIRST = 0.2  # the first 20% of a stage's steps always run (the latent moves most there)
MAX_THRESHOLD = 1.0  # a sum of relative changes of 1: skips nearly every step that may be skipped
INDICATOR_CHUNK_TOKENS = 8192  # 8192 x D per chunk (64 MiB at D = 4096 in bf16)

_ACTIVE: ContextVar[tuple[float, dict] | None] = ContextVar("ltx2_tp_step_cache", default=None)


@contextmanager
def enabled(threshold: float, report: dict) -> Iterator[None]:
    """While inside, the denoising loops (stages.denoise) cache steps at `threshold` (0: not at all)
    and put their counts in report[stage]."""
    token = _ACTIVE.set((threshold, report) if threshold > 0 else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def for_stage(c, denoise_fn, stage: str):
    """`denoise_fn` as the running request asks: cached (a StepCache's) or as it is."""
    active = _ACTIVE.get()
    if active is None:
        return denoise_fn
    threshold, report = active
    return StepCache(c.transformer, threshold, report.setdefault(stage, {})).wrap(denoise_fn)


class StepCache:
    """One stage's cache. `stats`: steps, skipped steps (and their indices), DiT passes run and
    skipped (a skipped step counts the passes of the step whose output it reuses), and the
    indicator per step (None: the first, which has no previous step)."""

    def __init__(self, model, threshold: float, stats: dict):
        self.model, self.threshold = model, threshold
        self.stats = stats
        stats.update(steps=0, skipped_steps=0, dit_passes=0, skipped_dit_passes=0, indicator=[], skipped_at=[])
        self.prev = None  # (video latent, video timesteps, audio latent, audio timesteps) of the last step
        self.acc = 0.0
        self.last = None  # (denoised outputs, DiT passes) of the last step run

    def wrap(self, denoise_fn):
        def step(video_state, audio_state, sigmas, step_index):  # ltx-pipelines' DenoisingFunc
            total = len(sigmas) - 1
            cur = (video_state.latent, video_state.denoise_mask * sigmas[step_index],
                   audio_state.latent, audio_state.denoise_mask * sigmas[step_index])
            change = self.change(self.prev, cur) if self.prev is not None else math.inf
            self.prev = cur
            self.stats["steps"] += 1
            self.stats["indicator"].append(None if math.isinf(change) else change)
            may_skip = math.ceil(RETAIN_FIRST * total) <= step_index < total - 1 and self.last is not None
            if may_skip and self.acc + change < self.threshold:
                self.acc += change
                self.stats["skipped_steps"] += 1
                self.stats["skipped_at"].append(step_index)
                self.stats["skipped_dit_passes"] += self.last[1]
                return self.last[0]
            self.acc = 0.0
            out, passes = _counting_passes(self.model, denoise_fn, video_state, audio_state, sigmas, step_index)
            self.stats["dit_passes"] += passes
            self.last = (out, passes)
            return out

        return step

    @torch.no_grad()
    def change(self, prev, cur) -> float:
        """max over the streams of sum |m - m_prev| / sum |m_prev|, m = block 0's modulated input."""
        changes = []
        for kind, i in (("video", 0), ("audio", 2)):
            if getattr(self.model.cfg, f"has_{kind}") and cur[i].shape[1] > 0:
                changes.append(self._stream_change(kind, prev[i], prev[i + 1], cur[i], cur[i + 1]))
        ctx = self.model.ctx
        x = torch.tensor([max(changes, default=0.0)], dtype=torch.float64,
                         device=cur[0].device if cur[0].is_cuda else "cpu")
        x = all_reduce_max(all_reduce_max(x, ctx.tp_group), ctx.sp_group)  # one decision on every rank
        return float(x)

    def _stream_change(self, kind: str, lat0, ts0, lat1, ts1) -> float:
        m = self.model
        p = "" if kind == "video" else "audio_"
        proj, adaln = getattr(m, f"{p}patchify_proj"), getattr(m, f"{p}adaln_single")
        table = getattr(m.transformer_blocks[0], f"{p}scale_shift_table")
        mult, eps, dtype = m.cfg.timestep_scale_multiplier, m.cfg.norm_eps, lat1.dtype

        def modulations(ts):
            b = ts.shape[0]
            return TokenModulation.build(ts.reshape(b, -1) * mult, lambda t: adaln(t, dtype))[0]

        mods = modulations(ts0), modulations(ts1)
        diff = norm = 0.0
        for s, e in token_chunks(lat1.shape[1], INDICATOR_CHUNK_TOKENS):
            a, b = (_modulated(proj, table, mod, lat[:, s:e], s, e, eps) for mod, lat in zip(mods, (lat0, lat1)))
            diff += float((b.float() - a.float()).abs().sum())
            norm += float(a.float().abs().sum())
        return diff / max(norm, 1e-30)


def _modulated(proj, table, mod: TokenModulation, latent, s: int, e: int, eps: float) -> torch.Tensor:
    with torch.inference_mode():
        x = proj(latent)
        shift, scale = ada_values(table, mod, s, e, slice(0, 2))
        return rms_norm(x, eps) * (1 + scale) + shift


def _counting_passes(model, fn, *args):
    """fn(*args) and the DiT passes it ran (batch elements of every forward of `model`)."""
    passes = [0]

    def hook(_module, args, kwargs):
        video = args[0] if args else kwargs.get("video")
        audio = args[1] if len(args) > 1 else kwargs.get("audio")
        passes[0] += (video if video is not None else audio).latent.shape[0]

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = fn(*args)
    finally:
        handle.remove()
    return out, passes[0]
