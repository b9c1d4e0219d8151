"""RGB -> YUV 4:2:0 (I420, BT.601 limited range) on the decoding device, as swscale does it for
libx264's input: the encoder thread then skips swscale (about 10 ms per 1080p frame on one CPU
core) and the device -> host copy is half the bytes.

Matched against PyAV 18's swscale (FFmpeg 8) on random frames: luma is its integer formula, bit
for bit; chroma (the mean of each horizontal pair, then a [1, 3, 3, 1] / 8 vertical filter, edge
rows repeated) differs by 1 level on ~7% of samples, because swscale's vertical filter rounds in
fixed point (test/test_decode.py bounds it). So this path is an option, not the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# swscale's rgb24 -> Y coefficients (BT.601, limited range, 15-bit fixed point), found by an exact fit
_Y = (8414, 16519, 3208, 540928)
# BT.601 limited range, 8 bit: U, V = 128 + (row . rgb) / 255
_U = (-37.797, -74.203, 112.0)
_V = (112.0, -93.786, -18.214)


def rgb_to_i420(frames: torch.Tensor) -> torch.Tensor:
    """(f, h, w, 3) uint8 RGB -> (f, h * 3 / 2, w) uint8: the Y plane, then U, then V, each chroma
    plane (h/2, w/2) laid out row after row, which is what PyAV's `yuv420p` arrays hold."""
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs an even size, got {w}x{h}")
    x = frames.to(torch.int32)
    r, g, b = x.unbind(-1)
    y = (_Y[0] * r + _Y[1] * g + _Y[2] * b + _Y[3]) >> 15
    # chroma from the mean of horizontal pairs, then rows 2i-1..2i+2 weighted 1, 3, 3, 1
    pair = x.view(f, h, w // 2, 2, 3).float().mean(3)  # (f, h, w/2, 3)
    pad = F.pad(pair.permute(0, 3, 1, 2), (0, 0, 1, 1), mode="replicate")  # rows -1 and h repeated
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device).view(1, 1, 4, 1).expand(3, 1, 4, 1) / 8
    sub = F.conv2d(pad, k, stride=(2, 1), groups=3)  # (f, 3, h/2, w/2)
    coef = torch.tensor([_U, _V], device=x.device) / 255
    uv = torch.einsum("cn,fnij->fcij", coef, sub).add_(128).round_().clamp_(0, 255)
    out = torch.empty(f, h * 3 // 2, w, dtype=torch.uint8, device=frames.device)
    out[:, :h] = y.clamp_(0, 255).to(torch.uint8)
    out[:, h:].view(f, 2, h // 2 * w // 2).copy_(uv.reshape(f, 2, -1).to(torch.uint8))
    return out
