"""Temporal-window self-attention: an opt-in APPROXIMATION of the video self-attention.

Each latent frame's video tokens attend only to the keys of the latent frames within `radius` (K)
of it in time, plus the keys every query sees: the tokens of clean frames (timestep 0 in every
sample: an image-conditioned first frame, a retake's kept frames) and the tokens appended after
the frame grid (keyframe or reference latents). Queries appended after the grid attend to every
key (they are few). K >= frames - 1 is exact attention (the plain kernel runs).

Tokens are frame-major (ltx-core's patchifier: f, h, w), so a window is a contiguous slice of the
keys: per query frame one attention call over keys [(f - K) HW, (f + K + 1) HW), with no mask, so
the attention work is about (2K + 1) / F of dense. Keys outside that slice (a clean first frame far
behind) are a second call, merged by log-sum-exp in fp32 (attention_backend.LseAccumulator).
The kernel is still attention_backend's choice (cuDNN, or the fp8 backend for >= 2048 keys).

Where it runs: one GPU, TP (heads split: windows are per token), the query-chunked path (each
frame's queries in chunks of the plan's attention chunk), two-pass attention (`rows`: a query
chunk's rows against the stored K/V of every token) and Ulysses (after its all-to-all every rank
holds every token of its heads). Not under ring attention, whose K/V blocks travel past every rank
(sequence.py refuses), with K/V offload (streamed blocks; plan.py refuses), nor with a
self-attention mask (IC-LoRA's attention strength).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.layers.attention_backend import LseAccumulator, attention, attention_lse, local_attention
from ltx2_tp.memory.plan import token_chunks
from ltx2_tp.profiling import nvtx_range

Ranges = tuple[tuple[int, int], ...]  # disjoint, sorted [start, end) token ranges


@dataclass(frozen=True)
class TemporalWindow:
    frames: int  # latent frames of the grid
    tokens_per_frame: int  # H x W latent cells
    radius: int  # K: a query frame sees frames f - K .. f + K
    total: int  # all video tokens: the grid, then any appended conditioning tokens
    clean_frames: tuple[int, ...] = ()  # grid frames whose tokens every query sees

    @property
    def grid_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def exact(self) -> bool:
        """Every query sees every key: the window spans the grid from any frame."""
        return self.radius >= self.frames - 1

    def key_ranges(self, frame: int | None) -> Ranges:
        """The keys a query of grid frame `frame` sees (None: a token after the grid sees all)."""
        if frame is None:
            return ((0, self.total),)
        hw, k = self.tokens_per_frame, self.radius
        ranges = [(max(0, frame - k) * hw, min(self.frames, frame + k + 1) * hw)]
        ranges += [(f * hw, (f + 1) * hw) for f in self.clean_frames]
        if self.total > self.grid_tokens:
            ranges.append((self.grid_tokens, self.total))
        return _merge(ranges)

    def visible(self) -> torch.Tensor:
        """(total, total) bool: which key each query sees (the dense mask the window equals: tests; O(T^2))."""
        out = torch.zeros(self.total, self.total, dtype=torch.bool)
        for s, e, frame in self._pieces(0, self.total, None):
            for a, b in self.key_ranges(frame):
                out[s:e, a:b] = True
        return out

    def _pieces(self, start: int, end: int, q_chunk: int | None):
        """(s, e, frame) over the query tokens [start, end): cut at frame boundaries, then into
        pieces of at most q_chunk tokens; frame None after the grid."""
        hw, grid = self.tokens_per_frame, self.grid_tokens
        s = start
        while s < end:
            frame = s // hw if s < grid else None
            stop = min(end, (frame + 1) * hw) if frame is not None else end
            for a, b in token_chunks(stop - s, q_chunk):
                yield s + a, s + b, frame
            s = stop

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_chunk: int | None = None,
                  mask: torch.Tensor | None = None, rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """local_attention's signature: q (B, n, H, d), the rows `rows` of the video sequence
        ((global start, count) segments; default all `total` tokens in order), against k / v
        (B, total, H, d) holding every video token."""
        if mask is not None:
            raise NotImplementedError("--attention-window-frames with a self-attention mask (IC-LoRA "
                                      "conditioning_attention_strength < 1) is not supported")
        if k.shape[1] != self.total:
            raise ValueError(f"windowed attention needs all {self.total} video keys, got {k.shape[1]}")
        if self.exact:
            return local_attention(q, k, v, q_chunk)
        return _windowed(self, q, k, v, q_chunk, rows or [(0, q.shape[1])])


@torch.compiler.disable  # one call per frame: left eager inside a compiled block (no unrolled graph)
def _windowed(w: TemporalWindow, q, k, v, q_chunk, rows) -> torch.Tensor:
    out = torch.empty_like(q)
    at = 0  # q's row of the segment's first token
    with nvtx_range("windowed_attention"):
        for start, n in rows:
            for s, e, frame in w._pieces(start, start + n, q_chunk):
                r = slice(at + s - start, at + e - start)
                out[:, r] = _attend(q[:, r], k, v, w.key_ranges(frame))
            at += n
    return out


def _attend(q, k, v, ranges: Ranges) -> torch.Tensor:
    if len(ranges) == 1:
        (a, b), = ranges
        return attention(q, k[:, a:b], v[:, a:b])
    acc = LseAccumulator()
    for a, b in ranges:
        acc.add(*attention_lse(q, k[:, a:b], v[:, a:b]))
    return acc.out.to(q.dtype)


def _merge(ranges: list[tuple[int, int]]) -> Ranges:
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def temporal_window(positions: torch.Tensor, timesteps: torch.Tensor | None, radius: int) -> TemporalWindow:
    """The window of one forward, read from the video Modality (one small host copy per forward).

    positions (B, 3, T, 2): tokens per frame = the distance to the next token at the first token's
    (h, w) cell (exact: cells are multiples of 32 pixels); the grid = the leading blocks of that
    many tokens whose start time does not decrease (appended conditioning tokens restart at their
    target frame's time). timesteps (B, T): grid frames at 0 in every sample are clean frames."""
    pos = positions[0, :, :, 0].float().cpu()  # (3, T) start coordinates of sample 0
    total = pos.shape[1]
    same = ((pos[1:, 1:] == pos[1:, :1]).all(0)).nonzero()
    hw = int(same[0]) + 1 if len(same) else total
    starts = pos[0, : total // hw * hw : hw]
    frames = 1
    while frames < len(starts) and starts[frames] >= starts[frames - 1]:
        frames += 1
    clean: tuple[int, ...] = ()
    if timesteps is not None and timesteps.reshape(timesteps.shape[0], -1).shape[1] == total:
        ts = timesteps.reshape(timesteps.shape[0], -1)[:, : frames * hw]
        zero = (ts == 0).all(0).reshape(frames, hw).all(1).cpu()
        clean = tuple(int(f) for f in zero.nonzero().flatten())
    return TemporalWindow(frames, hw, radius, total, clean)
