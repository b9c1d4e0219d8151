"""What travels into the DiT: per-modality inputs and guidance perturbations.

`Modality` has ltx-core's field names, so ltx-core's own `Modality` objects work unchanged, and
ltx-core's `BatchedPerturbationConfig` is accepted wherever `Perturbations` is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Modality:
    latent: torch.Tensor  # (B, T, C) patchified latent tokens
    sigma: torch.Tensor  # (B,) current sigma (cross-modal and prompt AdaLN)
    timesteps: torch.Tensor  # (B, T) per token (I2V: first-frame tokens 0) or (B, 1)
    positions: torch.Tensor  # (B, 3, T, 2) video / (B, 1, T, 2) audio: [start, end) coordinates
    context: torch.Tensor  # (B, S, caption channels) text embeddings
    enabled: bool = True
    context_mask: torch.Tensor | None = None  # (B, S) 1 = keep, or an additive float mask
    attention_mask: torch.Tensor | None = None  # (B, T, T) in [0, 1]; sp_size=1 only


SKIP_A2V = "skip_a2v_cross_attn"
SKIP_V2A = "skip_v2a_cross_attn"
SKIP_VIDEO_SELF_ATTN = "skip_video_self_attn"
SKIP_AUDIO_SELF_ATTN = "skip_audio_self_attn"
SKIP_KINDS = (SKIP_VIDEO_SELF_ATTN, SKIP_AUDIO_SELF_ATTN, SKIP_A2V, SKIP_V2A)


@dataclass(frozen=True)
class BlockSkips:
    """One block's share of the perturbations, resolved before the block runs (`per_block`): the
    skip kinds every sample takes, and for each kind any sample takes the (B,) keep-mask (1 runs
    the attention, 0 skips it). The block branches on these and never on its own index: a compiled
    block that evaluated `index in stg_blocks` was specialised on its index, one graph per block
    (LTX-2's STG on block 29: 48 compiles of the 19B block per request shape instead of 2)."""

    every: tuple[str, ...] = ()
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def all_in_batch(self, kind: str) -> bool:
        return kind in self.every

    def any_in_batch(self, kind: str) -> bool:
        return kind in self.masks

    def mask(self, kind: str) -> torch.Tensor:
        return self.masks[kind]


NO_SKIPS = BlockSkips()


@dataclass(frozen=True)
class Perturbations:
    """Per batch element, the (type, blocks) attention skips of STG guidance; blocks None = all."""

    per_sample: list[list[tuple[str, list[int] | None]]] = field(default_factory=list)

    @staticmethod
    def empty(batch_size: int) -> "Perturbations":
        return Perturbations([[] for _ in range(batch_size)])

    def _hit(self, sample, kind: str, block: int) -> bool:
        return any(t == kind and (blocks is None or block in blocks) for t, blocks in sample)

    def per_block(self, blocks: int, device, dtype) -> list[BlockSkips]:
        """Each block's BlockSkips; blocks with the same pattern share their mask tensors (one small
        host-to-device copy per pattern and forward, not one per block)."""
        if not any(self.per_sample):
            return [NO_SKIPS] * blocks
        masks: dict[tuple, torch.Tensor] = {}

        def keep(hits):
            if hits not in masks:
                masks[hits] = torch.tensor([0.0 if h else 1.0 for h in hits], device=device, dtype=dtype)
            return masks[hits]

        out = []
        for i in range(blocks):
            hits = {k: tuple(self._hit(s, k, i) for s in self.per_sample) for k in SKIP_KINDS}
            out.append(BlockSkips(tuple(k for k, h in hits.items() if all(h)),
                                  {k: keep(h) for k, h in hits.items() if any(h)}))
        return out


class _LtxCorePerturbations:
    """Adapter for ltx-core's BatchedPerturbationConfig (its enum instead of our strings)."""

    def __init__(self, cfg):
        from ltx_core.guidance.perturbations import PerturbationType

        self.cfg, self.T = cfg, PerturbationType

    def all_in_batch(self, kind, block):
        return self.cfg.all_in_batch(self.T(kind), block)

    def any_in_batch(self, kind, block):
        return self.cfg.any_in_batch(self.T(kind), block)

    def mask(self, kind, block, device, dtype):
        return self.cfg.mask(self.T(kind), block, device, dtype)

    def per_block(self, blocks: int, device, dtype) -> list[BlockSkips]:
        return [BlockSkips(tuple(k for k in SKIP_KINDS if self.all_in_batch(k, i)),
                           {k: self.mask(k, i, device, dtype) for k in SKIP_KINDS if self.any_in_batch(k, i)})
                for i in range(blocks)]


def as_perturbations(p, batch_size: int):
    if p is None:
        return Perturbations.empty(batch_size)
    if isinstance(p, Perturbations):
        return p
    return _LtxCorePerturbations(p)
