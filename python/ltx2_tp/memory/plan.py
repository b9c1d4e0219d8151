"""The one place that decides chunk sizes (and whether RoPE tables are cached per forward).

`ExecutionPlan` is what one forward runs with. A model is given a `PlanRule` at construction
(the memory budget) and, unless a forward is handed a plan, derives one per forward from the
video tokens an SP rank holds (`plan_for`): chunk when a whole-sequence intermediate would exceed
the budget. So a half-resolution stage 1 gets chunk sizes for its own token count.
"""

from __future__ import annotations

from dataclasses import dataclass


def token_chunks(n: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges covering n tokens in chunks of `size` (None or <= 0: one chunk)."""
    if n == 0:
        return []
    size = n if not size or size <= 0 else size
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass(frozen=True)
class ExecutionPlan:
    ffn_chunk_tokens: int | None = None  # FFN processed in token chunks (None: whole sequence)
    attn_chunk_tokens: int | None = None  # query chunks against the full K/V; also the QKV / modulation chunk
    cache_rope: bool = True  # build this rank's RoPE table once per forward instead of per chunk
    # TP: row-parallel outputs (attention out, FFN) are all-reduced per chunk of this many tokens,
    # each chunk's all-reduce running under the next chunk's compute (None: one all-reduce per call)
    comm_chunk_tokens: int | None = None
    # Ulysses: heads go through all-to-all -> attention -> all-to-all in this many groups, so one
    # group's all-to-all runs under another group's attention (1: no pipelining)
    ulysses_head_groups: int = 1
    # APPROXIMATION, opt-in (layers/windowed_attention.py): video self-attention sees only the latent
    # frames within this many of the query's, plus the conditioning tokens (None: exact attention)
    attention_window_frames: int | None = None

    def describe(self) -> str:
        window = f" attention_window_frames={self.attention_window_frames}" if self.attention_window_frames else ""
        return (f"ffn_chunk={self.ffn_chunk_tokens} attn_chunk={self.attn_chunk_tokens} cache_rope={self.cache_rope}"
                f" comm_chunk={self.comm_chunk_tokens} ulysses_head_groups={self.ulysses_head_groups}{window}")

    def out_chunks(self, n: int, size: int | None) -> list[tuple[int, int]]:
        """Chunks of a loop that ends in a row-parallel linear: `size`, or smaller for overlap."""
        sizes = [c for c in (size, self.comm_chunk_tokens) if c and c > 0]
        return token_chunks(n, min(sizes) if sizes else None)


OVERLAP_MIN_TOKENS = 4096  # below this, splitting work to hide communication costs more than it hides


def plan_for(local_video_tokens: int, inner_dim: int = 4096, tp_size: int = 1, ffn_mult: int = 4,
             budget_bytes: float = 2 * 2**30, dtype_bytes: int = 2, ulysses_size: int = 1,
             attention_window_frames: int | None = None) -> ExecutionPlan:
    """Chunk so that no FFN intermediate (tokens x 4D / tp) or per-chunk QKV exceeds budget_bytes;
    with Ulysses and enough tokens, pipeline the all-to-all in 2 head groups."""
    ffn_row = inner_dim * ffn_mult // tp_size * dtype_bytes
    ffn_chunk = None if local_video_tokens * ffn_row <= budget_bytes else max(256, int(budget_bytes // ffn_row))
    qkv_row = 3 * inner_dim // tp_size * dtype_bytes
    attn_chunk = None if local_video_tokens * qkv_row <= budget_bytes else max(256, int(budget_bytes // qkv_row))
    rope_bytes = 2 * local_video_tokens * inner_dim // tp_size * dtype_bytes
    # Ulysses head groups hide part of the all-to-all (2xH200, 32K tokens: exposed communication
    # 6.7% -> 6.0%). The TP chunked all-reduce is left off: cuBLAS's persistent GEMMs hold every SM,
    # so the NCCL kernel waits for them instead of overlapping (measured: no gain, more comm time).
    big = local_video_tokens >= 2 * OVERLAP_MIN_TOKENS
    head_groups = 2 if ulysses_size > 1 and big else 1
    return ExecutionPlan(ffn_chunk, attn_chunk, cache_rope=rope_bytes <= budget_bytes, ulysses_head_groups=head_groups,
                         attention_window_frames=attention_window_frames)


@dataclass(frozen=True)
class PlanRule:
    """How a model picks its plan when a forward is given none (LTX2LongVideo sets the budget; a
    request asking for the temporal-window approximation sets the window for its run)."""

    budget_bytes: float = 2 * 2**30
    dtype_bytes: int = 2
    attention_window_frames: int | None = None  # an opt-in approximation: never set by default

    def plan(self, local_video_tokens: int, inner_dim: int, tp_size: int = 1, ffn_mult: int = 4,
             ulysses_size: int = 1) -> ExecutionPlan:
        return plan_for(local_video_tokens, inner_dim, tp_size, ffn_mult, self.budget_bytes, self.dtype_bytes,
                        ulysses_size, self.attention_window_frames)
