"""What travels into the DiT: per-modality inputs and guidance perturbations.

`Modality` has ltx-core's field names, so ltx-core's own `Modality` objects work unchanged, and
ltx-core's `BatchedPerturbationConfig` is accepted wherever `Perturbations` is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

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


@functools.lru_cache(maxsize=256)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor on `device`, made once: a host-to-device copy from pageable memory
    waits for the stream, so a copy per forward (guidance keep-masks, row indices) drained the
    GPU's queue each step."""
    return torch.tensor(values, device=device, dtype=dtype)


def select_rows(m: Modality | None, rows: list[int]) -> Modality | None:
    """These batch rows of a Modality (every per-sample tensor indexed alike)."""
    if m is None:
        return None
    idx = device_constant(tuple(rows), m.latent.device, torch.int64)

    def pick(t):
        return None if t is None else t.index_select(0, idx.to(t.device))

    return replace(m, latent=pick(m.latent), sigma=pick(m.sigma.reshape(-1)), timesteps=pick(m.timesteps),
                   positions=pick(m.positions), context=pick(m.context), context_mask=pick(m.context_mask),
                   attention_mask=pick(m.attention_mask))


@dataclass(frozen=True)
class SharedPrefix:
    """Rows that need not run the first `fork` blocks: their inputs equal an earlier row's and so
    do their perturbations until block `fork`. The forward runs blocks [0, fork) on the `leaders`
    rows only, then gives each row of the whole batch a copy of its leader's residual streams
    (`index`: row -> position in leaders) and runs the rest on every row. LTX-2's STG pass equals
    the cond pass until block 29: 29 of its 48 blocks are not computed (15% of a 4-pass step)."""

    fork: int
    leaders: list[int]
    index: list[int]


@dataclass(frozen=True)
class Perturbations:
    """Per batch element, the (type, blocks) attention skips of STG guidance; blocks None = all.
    `same_inputs_as[j] = i` is the caller's word that row j's inputs (latent, sigma, timesteps,
    positions, context, masks) equal row i's; the forward then shares their common prefix of
    blocks (`shared_prefix`). Without it every row runs every block."""

    per_sample: list[list[tuple[str, list[int] | None]]] = field(default_factory=list)
    same_inputs_as: tuple[int | None, ...] | None = None

    def select(self, rows: list[int]) -> "Perturbations":
        return Perturbations([self.per_sample[r] for r in rows])

    def _roots(self) -> list[int]:
        """Each row's first row with the same inputs (itself when none)."""
        root = list(range(len(self.per_sample)))
        for j, s in enumerate(self.same_inputs_as or ()):
            if s is not None:
                if not 0 <= s < j:
                    raise ValueError(f"same_inputs_as[{j}] must name an earlier row, got {s}")
                root[j] = root[s]
        return root

    def distinct_contexts(self, rows: list[int]) -> tuple[list[int], list[int]] | None:
        """Of a forward over these rows: the positions of the rows whose text context is computed
        (one per group of equal inputs) and each position's group, or None when all differ. The
        text cross-attention's K/V are a function of the context alone: cond, STG and isolated
        passes share one (LTX-2 19B: 1,024 text tokens x 2 GEMMs of 4096^2 per block and row)."""
        root = self._roots()
        first: dict[int, int] = {}
        index = [first.setdefault(root[r], len(first)) for r in rows]
        if len(first) == len(rows):
            return None
        pos = {}
        for i, r in enumerate(rows):
            pos.setdefault(root[r], i)
        return list(pos.values()), index

    def shared_prefix(self, blocks: int) -> SharedPrefix | None:
        """The rows that share a prefix of blocks with an earlier row, and the first block where any
        of them differs (its skips first differ from its source's); None when no row saves a block."""
        if not self.same_inputs_as or not any(s is not None for s in self.same_inputs_as):
            return None
        n = len(self.per_sample)
        root = self._roots()

        def hits(row, block):
            return tuple(self._hit(self.per_sample[row], k, block) for k in SKIP_KINDS)

        def first_difference(j):
            return next((b for b in range(blocks) if hits(j, b) != hits(root[j], b)), blocks)

        forks = {j: first_difference(j) for j in range(n) if root[j] != j}
        forked = {j for j, f in forks.items() if f > 0}
        if not forked:
            return None
        leaders = [j for j in range(n) if j not in forked]
        pos = {r: i for i, r in enumerate(leaders)}
        return SharedPrefix(min(forks[j] for j in forked), leaders,
                            [pos[root[j]] if j in forked else pos[j] for j in range(n)])

    @staticmethod
    def empty(batch_size: int) -> "Perturbations":
        return Perturbations([[] for _ in range(batch_size)])

    def _hit(self, sample, kind: str, block: int) -> bool:
        return any(t == kind and (blocks is None or block in blocks) for t, blocks in sample)

    def per_block(self, blocks: int, device, dtype) -> list[BlockSkips]:
        """Each block's BlockSkips; blocks with the same pattern share their mask tensors (made once
        per pattern and device: device_constant)."""
        if not any(self.per_sample):
            return [NO_SKIPS] * blocks

        def keep(hits):
            return device_constant(tuple(0.0 if h else 1.0 for h in hits), torch.device(device), dtype)

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

    def shared_prefix(self, blocks: int) -> None:
        return None

    def distinct_contexts(self, rows: list[int]) -> None:
        return None

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
