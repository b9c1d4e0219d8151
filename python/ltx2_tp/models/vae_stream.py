"""ltx-core's video VAE decoder, run over time in pieces that carry their convolutions' state.

Every temporal coupling in the LTX-2 / LTX-2.3 decoder is a 3-frame convolution (CausalConv3d, in
its non-causal or causal padding); the rest is per frame (PixelNorm, SiLU, timestep scale and shift,
1x1x1 convolutions, depth-to-space, unpatchify). So the decoder can take its input a few frames at
a time if each convolution keeps the last 2 frames it saw (the first piece gets ltx-core's
replicated first frame, the last piece its replicated last frame) and each residual add waits for
the frames its convolution path still holds back. Nothing is recomputed and nothing is blended:
the frames equal `decoder(latent)`'s (test/test_vae_stream.py), unlike ltx-core's temporal tiles,
which decode overlapping windows again and blend them (an approximation of the whole decode).

Between stages (conv_in, each up block, the output head) the frames are cut into pieces again,
each about `chunk_frames` output frames' worth, so the first frames come out while later ones are
still being decoded: a non-causal decoder's frame 0 depends on ~22 latent frames on each side, so
the latent-level stages run over everything before the first output frame exists (LTX-2: 8% of the
FLOPs; the 2x, 4x and 8x levels have 15, 31 and 46%), then pieces flow. Memory: one piece per stage
is alive, plus 2 frames per convolution.

Only what ltx-core's forward does is supported; a decoder with GroupNorm over time, attention or
noise injection is refused (`unsupported`), and the caller keeps ltx-core's own decode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from einops import rearrange

from ltx2_tp.compat import ensure_ltx_imports

ensure_ltx_imports()

from ltx_core.model.common.normalization import PixelNorm  # noqa: E402
from ltx_core.model.video_vae.convolution import CausalConv3d  # noqa: E402
from ltx_core.model.video_vae.ops import unpatchify  # noqa: E402
from ltx_core.model.video_vae.resnet import ResnetBlock3D, UNetMidBlock3D  # noqa: E402
from ltx_core.model.video_vae.sampling import DepthToSpaceUpsample  # noqa: E402

# Smallest piece, in voxels of the stage's input (frames x h x w), so the convolutions' GEMMs
# (M = voxels) stay large: 768x512's latent-level stages then take the whole video at once. Chosen,
# not measured: bench_decode.py times pieces of 8 / 16 / 32 frames against the whole video.
MIN_PIECE_VOXELS = 1 << 15
CHUNK_FRAMES = 16  # output frames per piece at the last stage (1920x1088: ~4.5 GiB of bf16 activations)


@dataclass(frozen=True)
class Streamed:
    """stages.decode_video's tiling argument for stream_decode: pieces of ~`chunk_frames` frames."""

    chunk_frames: int = CHUNK_FRAMES


def unsupported(decoder) -> str | None:
    """Why `decoder` cannot be streamed exactly, or None."""
    if not isinstance(getattr(decoder, "conv_norm_out", None), PixelNorm):
        return "conv_norm_out is not PixelNorm (a norm over time)"
    convs = [m for m in decoder.modules() if isinstance(m, CausalConv3d)]
    for m in convs:
        c = m.conv
        if c.stride != (1, 1, 1) or c.dilation[0] != 1 or m.time_kernel_size % 2 == 0:
            return f"temporal convolution with stride {c.stride}, dilation {c.dilation}, kernel {m.time_kernel_size}"
    wrapped = {id(m.conv) for m in convs}
    if any(isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] > 1 and id(m) not in wrapped for m in decoder.modules()):
        return "a temporal convolution that is not a CausalConv3d"
    for i, b in enumerate(decoder.up_blocks):
        if isinstance(b, UNetMidBlock3D):
            blocks = list(b.res_blocks)
        elif isinstance(b, ResnetBlock3D):
            blocks = [b]
        elif isinstance(b, DepthToSpaceUpsample):
            if b.stride[0] not in (1, 2):
                return f"up_blocks.{i}: temporal upsampling by {b.stride[0]}"
            continue
        else:
            return f"up_blocks.{i}: {type(b).__name__}"
        for r in blocks:
            if r.inject_noise:
                return f"up_blocks.{i}: noise injection"
            if not (isinstance(r.norm1, PixelNorm) and isinstance(r.norm2, PixelNorm)):
                return f"up_blocks.{i}: GroupNorm (statistics over all frames)"
            if not isinstance(r.norm3, torch.nn.Identity):
                return f"up_blocks.{i}: GroupNorm shortcut (statistics over all frames)"
    return None


# ---- streamed operations: op(x, last) -> frames now ready (or None); x None = nothing new -------

def _frames(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.shape[2]


class _Conv:
    """CausalConv3d over a stream: the last k-1 input frames are kept for the next piece."""

    def __init__(self, m: CausalConv3d, causal: bool):
        self.conv, self.k = m.conv, m.time_kernel_size
        self.left = self.k - 1 if causal else (self.k - 1) // 2  # replicated first frames, as ltx-core pads
        self.right = 0 if causal else (self.k - 1) // 2  # replicated last frames
        self.tail: torch.Tensor | None = None

    def __call__(self, x, last):
        parts = []
        if self.tail is None:
            if x is None:
                return None
            parts += [x[:, :, :1].repeat(1, 1, self.left, 1, 1)] if self.left else []
        else:
            parts.append(self.tail)
        if x is not None:
            parts.append(x)
        if last and self.right:
            parts.append(parts[-1][:, :, -1:].repeat(1, 1, self.right, 1, 1))
        seq = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        self.tail = None if last else seq[:, :, max(0, seq.shape[2] - (self.k - 1)):].clone()
        return self.conv(seq) if seq.shape[2] >= self.k else None


class _Fn:
    """A per-frame function."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, last):
        return None if x is None else self.fn(x)


class _DropFirst:
    """Drops the stream's first frame (depth-to-space in time makes one frame too many)."""

    def __init__(self):
        self.done = False

    def __call__(self, x, last):
        if x is None or self.done:
            return x
        self.done = True
        return x[:, :, 1:] if x.shape[2] > 1 else None


class _Chain:
    def __init__(self, *ops):
        self.ops = ops

    def __call__(self, x, last):
        for op in self.ops:
            x = op(x, last)
        return x


class _Residual:
    """skip(x) + inner(x), frame by frame: the skip path's frames wait for the inner path's."""

    def __init__(self, inner, skip):
        self.inner, self.skip, self.queue = inner, skip, []

    def __call__(self, x, last):
        s = self.skip(x, last)
        if s is not None:
            self.queue.append(s)
        y = self.inner(x, last)
        if y is None:
            return None
        n, taken = y.shape[2], []
        while n:
            head = self.queue[0]
            if head.shape[2] <= n:
                taken.append(self.queue.pop(0))
                n -= head.shape[2]
            else:
                taken.append(head[:, :, :n])
                self.queue[0] = head[:, :, n:]
                n = 0
        return (torch.cat(taken, 2) if len(taken) > 1 else taken[0]) + y  # ltx-core adds in this order


def _resnet(r: ResnetBlock3D, causal: bool, ada: torch.Tensor | None):
    """ResnetBlock3D.forward, streamed (`ada`: its timestep table values, or None)."""
    shift1 = scale1 = shift2 = scale2 = None
    if ada is not None:
        shift1, scale1, shift2, scale2 = ada.unbind(dim=1)

    def pre1(h):
        h = r.norm1(h)
        if ada is not None:
            h = h * (1 + scale1) + shift1
        return r.non_linearity(h)

    def pre2(h):
        h = r.norm2(h)
        if ada is not None:
            h = h * (1 + scale2) + shift2
        return r.dropout(r.non_linearity(h))

    inner = _Chain(_Fn(pre1), _Conv(r.conv1, causal), _Fn(pre2), _Conv(r.conv2, causal))
    return _Residual(inner, _Fn(lambda x: r.conv_shortcut(r.norm3(x))))


def _depth_to_space(b: DepthToSpaceUpsample, causal: bool):
    """DepthToSpaceUpsample.forward, streamed."""
    p1, p2, p3 = b.stride
    up = lambda x: rearrange(x, "b (c p1 p2 p3) d h w -> b c (d p1) (h p2) (w p3)", p1=p1, p2=p2, p3=p3)  # noqa: E731
    conv = [_Conv(b.conv, causal), _Fn(up)] + ([_DropFirst()] if p1 == 2 else [])
    if not b.residual:
        return _Chain(*conv)
    repeat = math.prod(b.stride) // b.out_channels_reduction_factor
    skip = [_Fn(lambda x: up(x).repeat(1, repeat, 1, 1, 1))] + ([_DropFirst()] if p1 == 2 else [])
    return _Residual(_Chain(*conv), _Chain(*skip))


class _Stage:
    """One stage of the decoder and the shape of its input, for cutting pieces."""

    def __init__(self, op, t_scale: int, h: int, w: int):
        self.op, self.t_scale, self.h, self.w = op, t_scale, h, w


def _stages(dec, latent: torch.Tensor, timestep: torch.Tensor | None) -> list[_Stage]:
    """VideoDecoder.forward after un_normalize, as streamed stages."""
    b, causal, dtype = latent.shape[0], dec.causal, latent.dtype
    scaled = None
    if dec.timestep_conditioning:
        if timestep is None:
            timestep = torch.full((b,), dec.decode_timestep, device=latent.device, dtype=dtype)
        scaled = timestep * dec.timestep_scale_multiplier.to(latent)
    t, h, w = 1, latent.shape[3], latent.shape[4]
    stages = [_Stage(_Conv(dec.conv_in, causal), t, h, w)]
    for block in dec.up_blocks:
        if isinstance(block, UNetMidBlock3D):
            emb = None
            if block.timestep_conditioning:
                emb = block.time_embedder(timestep=scaled.flatten(), hidden_dtype=dtype)
                emb = emb.view(b, emb.shape[-1], 1, 1, 1)
            ops = [_resnet(r, causal, _ada(r, emb, dtype)) for r in block.res_blocks]
            stages.append(_Stage(_Chain(*ops), t, h, w))
        elif isinstance(block, ResnetBlock3D):
            stages.append(_Stage(_resnet(block, causal, None), t, h, w))
        else:
            stages.append(_Stage(_depth_to_space(block, causal), t, h, w))
            t, h, w = t * block.stride[0], h * block.stride[1], w * block.stride[2]

    shift = scale = None
    if dec.timestep_conditioning:
        emb = dec.last_time_embedder(timestep=scaled.flatten(), hidden_dtype=dtype)
        emb = emb.view(b, emb.shape[-1], 1, 1, 1)
        ada = dec.last_scale_shift_table[None, ..., None, None, None].to(device=latent.device, dtype=dtype) + \
            emb.reshape(b, 2, -1, emb.shape[-3], emb.shape[-2], emb.shape[-1])
        shift, scale = ada.unbind(dim=1)

    def head(x):
        x = dec.conv_norm_out(x)
        if shift is not None:
            x = x * (1 + scale) + shift
        return dec.conv_act(x)

    out = _Chain(_Fn(head), _Conv(dec.conv_out, causal),
                 _Fn(lambda x: unpatchify(x, patch_size_hw=dec.patch_size, patch_size_t=1)))
    stages.append(_Stage(out, t, h, w))
    return stages


def _ada(r: ResnetBlock3D, emb: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if not r.timestep_conditioning:
        return None
    return r.scale_shift_table[None, ..., None, None, None].to(device=emb.device, dtype=dtype) + \
        emb.reshape(emb.shape[0], 4, -1, emb.shape[-3], emb.shape[-2], emb.shape[-1])


def piece_frames(stage: _Stage, t_out: int, chunk_frames: int, min_voxels: int = MIN_PIECE_VOXELS) -> int:
    """Frames per piece at `stage`'s input: `chunk_frames` output frames' worth, at least `min_voxels`."""
    return max(-(-chunk_frames * stage.t_scale // t_out), -(-min_voxels // (stage.h * stage.w)))


@torch.no_grad()
def stream_decode(decoder, latent: torch.Tensor, chunk_frames: int = CHUNK_FRAMES,
                  generator: torch.Generator | None = None, timestep: torch.Tensor | None = None,
                  min_voxels: int | None = None) -> Iterator[torch.Tensor]:
    """(B, 3, f, H, W) pieces, in order; concatenated over time they are `decoder(latent, timestep,
    generator)`. `chunk_frames`: about how many output frames each piece has; `min_voxels`: the
    smallest piece (default MIN_PIECE_VOXELS)."""
    why = unsupported(decoder)
    if why is not None:
        raise ValueError(f"this VAE decoder cannot be streamed: {why}")
    sample = latent
    if decoder.timestep_conditioning:  # the same draw as forward's, over the whole latent
        noise = torch.randn(sample.size(), generator=generator, dtype=sample.dtype, device=sample.device)
        sample = noise * decoder.decode_noise_scale + (1.0 - decoder.decode_noise_scale) * sample
    sample = decoder.per_channel_statistics.un_normalize(sample)
    stages = _stages(decoder, sample, timestep)
    t_out = stages[-1].t_scale
    sizes = [piece_frames(s, t_out, chunk_frames, MIN_PIECE_VOXELS if min_voxels is None else min_voxels)
             for s in stages]
    yield from _push(stages, sizes, 0, sample, True)


def _push(stages, sizes, i, x, last) -> Iterator[torch.Tensor]:
    """Pieces of x (at most sizes[i] frames) through stage i, what comes out through the next."""
    n = _frames(x)
    cuts = list(range(0, n, sizes[i])) or [0]
    for j, start in enumerate(cuts):
        piece = x[:, :, start:start + sizes[i]] if n else None
        end = last and j == len(cuts) - 1
        y = stages[i].op(piece, end)
        if i + 1 == len(stages):
            if y is not None:
                yield y
        elif y is not None or end:
            yield from _push(stages, sizes, i + 1, y, end)
