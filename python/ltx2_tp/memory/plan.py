"""The one place that decides chunk sizes, the activation tier and whether RoPE tables are cached.

`ExecutionPlan` is what one forward runs with. A model is given a `PlanRule` at construction
and, unless a forward is handed a plan, derives one per forward from the tokens an SP rank holds:
- by default (`budget_bytes`, LTX2LongVideo's 2 GiB) chunk when a whole-sequence intermediate would
  exceed the budget (`plan_for`): a half-resolution stage 1 gets chunk sizes for its own tokens;
- with `activation_budget_bytes` (the planner: what remains of a GPU after weights) the fastest plan
  whose whole activation peak (memory/estimate.py) fits (`plan_within`): one pass; else two-pass
  attention with the largest chunks that fit; else K/V parked in host memory; else the residual too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ltx2_tp.memory.estimate import StepShape, activation_bytes


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
    # Activation tiers (memory/offload.py). Self-attention over more tokens than one attention chunk
    # runs in two passes (K/V of every token first, then the queries chunk by chunk), so no
    # whole-sequence q or output exists. kv_offload parks that K/V in pinned host memory and streams
    # it back in blocks of kv_block_tokens per query chunk (log-sum-exp merge); residual_offload parks
    # the video residual stream there too, streamed per chunk through every sub-layer.
    kv_offload: bool = False
    residual_offload: bool = False
    kv_block_tokens: int | None = None  # None: one block of all keys
    # APPROXIMATION, opt-in (layers/windowed_attention.py): video self-attention sees only the latent
    # frames within this many of the query's, plus the conditioning tokens (None: exact attention)
    attention_window_frames: int | None = None

    def __post_init__(self):
        if self.kv_offload and self.ulysses_head_groups > 1:
            # streamed K/V blocks serve all of a chunk's heads at once: groups would stream them G times
            raise ValueError("kv_offload needs ulysses_head_groups=1")
        if self.kv_offload and self.attention_window_frames is not None:
            # streamed K/V blocks go past every query chunk: the window would need per-block ranges
            raise ValueError("--attention-window-frames is not supported with K/V offload (the activation "
                             "tier chosen for this size and memory); drop the window or use more GPUs")

    def describe(self) -> str:
        window = f" attention_window_frames={self.attention_window_frames}" if self.attention_window_frames else ""
        return (f"ffn_chunk={self.ffn_chunk_tokens} attn_chunk={self.attn_chunk_tokens} cache_rope={self.cache_rope}"
                f" comm_chunk={self.comm_chunk_tokens} ulysses_head_groups={self.ulysses_head_groups}"
                f" kv_offload={self.kv_offload} residual_offload={self.residual_offload}"
                f" kv_block={self.kv_block_tokens}{window}")

    def two_pass(self, tokens: int, kv_offload: bool = False) -> bool:
        """Self-attention over `tokens` (the most any rank of the sequence group holds) in two passes:
        when its queries span more than one attention chunk, or its K/V live in host memory."""
        return kv_offload or len(token_chunks(tokens, self.attn_chunk_tokens)) > 1

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


# Attention chunks the budget rule tries, largest first: fewer, larger chunks run the GEMMs and
# cuDNN attention at full rate, and streamed K/V hides under attention from about 16K queries on
# (memory/offload.py). The FFN walks half of that (its activation is 4D wide, attention's ~1.5D).
ATTN_CHUNKS = (65536, 49152, 32768, 24576, 16384, 12288, 8192, 6144, 4096, 3072, 2048, 1024)
KV_BLOCKS = (65536, 32768, 16384, 8192, 4096)
# Streamed K/V moves all keys once per query chunk: its copies hide under attention only from about
# 16K queries per chunk on (H100: 500 TFLOP/s attention vs 46.6 GB/s, memory/offload.py)
KV_OFFLOAD_MIN_QUERIES = 16384


def plan_within(cfg, shape: StepShape, budget_bytes: float) -> tuple[ExecutionPlan, int, bool]:
    """The fastest plan whose activation peak (memory/estimate.py) fits `budget_bytes`, its bytes and
    True; when none fits, the plan with the fewest bytes, its bytes and False (the planner refuses).
    Tiers in order: one pass; two-pass attention (chunks largest first, RoPE tables cached if they
    fit); K/V in host memory (also K/V blocks largest first); the residual in host memory too (under
    ring attention, which keeps its K/V blocks, only the residual)."""
    best = None
    for plan in _candidates(shape):
        b = activation_bytes(cfg, plan, shape)
        if b <= budget_bytes:
            return plan, b, True
        if best is None or b < best[1]:
            best = (plan, b)
    return best[0], best[1], False


def _candidates(shape: StepShape):
    n = shape.video_tokens
    groups = 2 if shape.ulysses > 1 and n >= 2 * OVERLAP_MIN_TOKENS else 1
    for cache in (True, False):
        yield ExecutionPlan(cache_rope=cache, ulysses_head_groups=groups)
    # a short sequence may also be cut into 2 to 16 chunks (a budget that small only fits tests)
    chunks = [c for c in ATTN_CHUNKS if c < n] or [n // 2**k for k in range(1, 5) if n // 2**k] or [n]
    ring = shape.ring > 1
    tiers = [{}, {"residual_offload": True}] if ring else [{}, {"kv_offload": True},
                                                         {"kv_offload": True, "residual_offload": True}]
    for tier in tiers:
        for c in chunks:
            if tier.get("kv_offload") and c * shape.ulysses < KV_OFFLOAD_MIN_QUERIES <= n * shape.ulysses:
                continue
            for cache in (True, False):
                kw = dict(attn_chunk_tokens=c, ffn_chunk_tokens=max(c // 2, min(c, ATTN_CHUNKS[-1])), cache_rope=cache,
                          **tier)
                if tier.get("kv_offload"):
                    keys = n * shape.ulysses
                    for kb in [b for b in KV_BLOCKS if b < keys] or [keys // 2**k for k in range(1, 5) if keys // 2**k]:
                        yield ExecutionPlan(**kw, kv_block_tokens=kb)
                else:
                    yield ExecutionPlan(**kw, ulysses_head_groups=groups)


@dataclass(frozen=True)
class PlanRule:
    """How a model picks its plan when a forward is given none (LTX2LongVideo sets `budget_bytes`;
    the planner sets `activation_budget_bytes`, what remains of the GPU after weights; a
    request asking for the temporal-window approximation sets the window for its run)."""

    budget_bytes: float = 2 * 2**30  # the largest whole-sequence intermediate (plan_for)
    dtype_bytes: int = 2
    activation_budget_bytes: float | None = None  # the whole forward's activations (plan_within)
    attention_window_frames: int | None = None  # an opt-in approximation: never set by default

    def plan(self, local_video_tokens: int, inner_dim: int, tp_size: int = 1, ffn_mult: int = 4,
             ulysses_size: int = 1) -> ExecutionPlan:
        return plan_for(local_video_tokens, inner_dim, tp_size, ffn_mult, self.budget_bytes, self.dtype_bytes,
                        ulysses_size, self.attention_window_frames)

    def for_step(self, cfg, shape: StepShape) -> ExecutionPlan:
        """The plan for one forward of `shape` (this rank's tokens) on a model of `cfg`."""
        if self.activation_budget_bytes is None:
            return self.plan(shape.video_tokens, cfg.inner_dim, shape.tp, cfg.ff_mult, shape.ulysses)
        plan = plan_within(cfg, shape, self.activation_budget_bytes)[0]
        return replace(plan, attention_window_frames=self.attention_window_frames)
