"""The activation formula: bytes one DiT forward keeps alive at its peak, per rank, before running it.

`activation_bytes(cfg, plan, shape)` is the peak of live activation bytes (weights excluded) of one
forward of models/ltx2/model.py under `plan`, for the tokens one rank holds (`StepShape`). It
mirrors the code: what lives for the whole forward (the residual streams, AdaLN indices, text
contexts, cached RoPE tables) plus the largest of the sub-layers' own peaks, each written as the
few tensors alive at its heaviest step. Chunk sizes enter through those steps, so the formula is
what the plan rule and the planner use to choose chunk sizes and the offload tier for a budget.

Checked against the dispatch-mode probe (test/memory_probe.py: every tensor an op returns, alive
until freed) on CPU at several sizes, tiers, dtypes and TP / Ulysses / ring layouts
(test_activation_memory.py: within 10%). A GPU adds what the probe does not see: the caching
allocator's rounding and fragmentation, kernel workspaces (cuBLAS, cuDNN attention) and the
CUDA context; the planner adds those as a margin. Big terms, 19B at 1920x1088x1441 (369,240
tokens, bf16, one GPU): residual 2.82 GiB, K and V 2.82 GiB each, a cached RoPE table 2.82 GiB
(self) + 1.41 GiB (a<->v); everything else is chunk-sized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ltx2_tp.models.ltx2.config import LTX2Config

FP32 = 4
INDEX = 8  # int64 AdaLN row index per token (torch.unique's inverse)


@dataclass(frozen=True)
class StepShape:
    """What one rank runs in one forward: its video tokens (an SP part: the largest), the audio and
    text tokens (whole on every rank), the batch, and the parallel layout."""

    video_tokens: int  # this rank's (tokens_per_rank of the whole video over the SP ranks)
    audio_tokens: int = 0
    text_tokens: int = 0
    batch: int = 1
    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    per_token_timesteps: bool = True  # (B, T) timesteps (pipelines: I2V gives first-frame tokens 0)
    dtype_bytes: int = 2


@dataclass
class ActivationEstimate:
    persistent: dict[str, int] = field(default_factory=dict)  # alive for the whole forward
    phases: dict[str, int] = field(default_factory=dict)  # each sub-layer's own peak on top of them

    @property
    def peak(self) -> int:
        return sum(self.persistent.values()) + max(self.phases.values(), default=0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get) if self.phases else ""


def activation_bytes(cfg: LTX2Config, plan, shape: StepShape) -> int:
    """Peak live activation bytes of one forward on one rank (see the module docstring)."""
    return estimate_activations(cfg, plan, shape).peak


def estimate_activations(cfg: LTX2Config, plan, shape: StepShape) -> ActivationEstimate:
    est = ActivationEstimate()
    video = cfg.has_video and shape.video_tokens > 0
    audio = cfg.has_audio and shape.audio_tokens > 0
    if video:
        v = _Stream(cfg, shape, plan, True)
        est.persistent.update(v.persistent())
        est.phases.update(v.phases())
    if audio:
        a = _Stream(cfg, shape, plan, False)
        est.persistent.update(a.persistent())
        est.phases.update(a.phases())
    if video and audio:
        est.phases["av_cross_attention"] = _av_phase(cfg, plan, shape)
    return est


def _chunk(n: int, size: int | None) -> int:
    return n if not size or size <= 0 else min(n, size)


def _out_chunk(plan, n: int, size: int | None) -> int:
    sizes = [c for c in (size, plan.comm_chunk_tokens) if c and c > 0]
    return _chunk(n, min(sizes) if sizes else None)


def _rope_table(tokens: int, dim: int, tp: int, rope_type: str, e: int, b: int) -> int:
    """cos + sin of `tokens` for this rank's part of `dim` (split: dim/2 each; interleaved: dim each)."""
    return b * tokens * dim // tp * e * (1 if rope_type == "split" else 2)


def _rope_compute(tokens: int, dim: int, tp: int, rope_type: str, e: int, b: int) -> int:
    """Building a table (layers/rope.py): fp32 angles, cos and sin of every head, then this rank's
    copy; the most alive at once."""
    half = b * tokens * dim // 2 * FP32
    if rope_type == "split":
        return 3 * half + _rope_table(tokens, dim, tp, rope_type, e, b)
    return 5 * half + _rope_table(tokens, dim, tp, rope_type, e, b)


class _Stream:
    """One modality's terms: video (SP-split, offload tiers) or audio (whole, resident)."""

    def __init__(self, cfg: LTX2Config, shape: StepShape, plan, video: bool):
        self.cfg, self.shape, self.plan, self.video = cfg, shape, plan, video
        self.b, self.e, self.tp = shape.batch, shape.dtype_bytes, shape.tp
        if video:
            self.name, self.n = "video", shape.video_tokens
            self.d, self.heads, self.hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
            self.sp_u, self.ring = shape.ulysses, shape.ring
        else:
            self.name, self.n = "audio", shape.audio_tokens
            self.d, self.heads, self.hd = cfg.audio_inner_dim, cfg.audio_num_attention_heads, cfg.audio_attention_head_dim
            self.sp_u, self.ring = 1, 1
        self.dt = self.d // self.tp  # this rank's heads' width (q, k, v, attention output)
        self.split = video and shape.ulysses * shape.ring > 1
        self.x_offload = video and plan.residual_offload
        self.kv_offload = video and plan.kv_offload
        self.cross_dim = cfg.audio_cross_attention_dim if cfg.has_video and cfg.has_audio else 0

    # ---- unit sizes ------------------------------------------------------------------------------
    def row(self, tokens: int, width: int, e: int | None = None) -> int:
        return self.b * tokens * width * (self.e if e is None else e)

    def modulate(self, c: int, k: int) -> int:
        """ada_values (k of the table's parameters gathered per token, then added) and
        rms_norm(x) * (1 + scale) + shift: the most alive at once, the result included."""
        if not self.shape.per_token_timesteps:
            return self.row(c, self.d) * 3
        return self.row(c, self.d) * max(2 * k, k + 3)

    def rope_chunk(self, c: int) -> int:
        """Per chunk: a slice of the cached table (a view) or a table built for it."""
        if self.plan.cache_rope:
            return 0
        return _rope_compute(c, self.d, self.tp, self.cfg.rope_type, self.e, self.b)

    def rope_table(self, c: int) -> int:
        return 0 if self.plan.cache_rope else _rope_table(c, self.d, self.tp, self.cfg.rope_type, self.e, self.b)

    def norm(self, c: int, width: int) -> int:
        """q / k RMSNorm: under TP fp32 copies and squares for the all-reduced sum (layers/norm.py)."""
        return self.row(c, width) + (0 if self.tp == 1 else 2 * self.row(c, width, FP32))

    def norm_pair(self, c: int) -> int:
        """q and k normed together (one all-reduce): both fp32 copies alive, a temporary, the outputs."""
        return 2 * self.row(c, self.dt) + (0 if self.tp == 1 else 3 * self.row(c, self.dt, FP32))

    # ---- what lives for the whole forward --------------------------------------------------------
    def persistent(self) -> dict[str, int]:
        cfg, n, p = self.cfg, self.n, self.name
        out = {f"{p}_residual": 0 if self.x_offload else self.row(n, self.d)}
        if self.shape.per_token_timesteps:
            out[f"{p}_adaln_index"] = self.b * n * INDEX
        if cfg.caption_projection:
            out[f"{p}_text_context"] = self.row(self.shape.text_tokens, self.d)
        if self.plan.cache_rope:
            out[f"{p}_rope_table"] = _rope_table(n, self.d, self.tp, cfg.rope_type, self.e, self.b)
            if self.cross_dim:
                out[f"{p}_cross_rope_table"] = _rope_table(n, self.cross_dim, self.tp, cfg.rope_type, self.e, self.b)
        return out

    # ---- each sub-layer's own peak ---------------------------------------------------------------
    def phases(self) -> dict[str, int]:
        p = self.name
        return {f"{p}_prepare": self.prepare(), f"{p}_self_attention": self.self_attention(),
                f"{p}_text_attention": self.text_attention(), f"{p}_feedforward": self.feedforward(),
                f"{p}_output": self.output()}

    def prepare(self) -> int:
        """Patchify (the residual itself, counted as persistent; chunked when parked), timesteps,
        the caption projection's hidden layer, RoPE tables built chunk by chunk."""
        cfg, n, plan = self.cfg, self.n, self.plan
        text = self.row(self.shape.text_tokens, self.d) if cfg.caption_projection else 0
        ts = self.b * n * FP32 * 2 if self.shape.per_token_timesteps else 0
        patch = self.row(_chunk(n, plan.ffn_chunk_tokens), self.d) if self.x_offload else 0
        rope = 0
        if plan.cache_rope:
            c = _chunk(n, plan.attn_chunk_tokens)
            rope = _rope_compute(c, self.d, self.tp, cfg.rope_type, self.e, self.b)
        return max(text, ts, patch, rope)

    def _walk(self, c: int, slots: int) -> int:
        """Device chunk slots of a parked residual's walk."""
        return slots * self.row(c, self.d) if self.x_offload else 0

    def ada(self, c: int, k: int) -> int:
        """k gathered AdaLN parameters of a chunk (per-token timesteps; else one row per sample)."""
        return self.row(c, k * self.d) if self.shape.per_token_timesteps else 0

    def _pending(self, c: int, chunks: int, k: int) -> int:
        """The previous chunk's output in flight (its all-reduce under this chunk's GEMMs: chunked.py)
        and the k gathered AdaLN values its gate is a view of."""
        return 0 if chunks < 2 else self.row(c, self.d) + self.ada(c, k)

    def _rope_step(self, c: int) -> int:
        """A chunk's table being built, or 0 (a slice of the cached one), the table then alive."""
        return self.rope_chunk(c)

    def _rotate(self, c: int) -> int:
        """apply_rope: the rotated copy (and split RoPE's negated sin)."""
        extra = self.row(c, self.dt) // 2 if self.cfg.rope_type == "split" else 2 * self.row(c, self.dt)
        return self.row(c, self.dt) + extra

    def self_attention(self) -> int:
        plan, n = self.plan, self.n
        two_pass = plan.two_pass(n, self.kv_offload) and not (self.split and self.ring > 1)
        if two_pass:
            return self._two_pass()
        return self._one_pass()

    def _two_pass(self) -> int:
        plan, n, u = self.plan, self.n, self.sp_u
        c1 = _chunk(n, plan.attn_chunk_tokens)
        c2 = _out_chunk(plan, n, plan.attn_chunk_tokens)
        group = n * u  # this Ulysses group's tokens (the largest part times U)
        dkv = self.dt // u  # K/V width this rank keeps: its heads of all the group's tokens
        if self.kv_offload:  # two slots of a K and V block (one when one block holds every key)
            kb = _chunk(group, plan.kv_block_tokens)
            keys = min(2, -(-group // kb)) * 2 * self.row(kb, dkv)
        else:
            keys = 2 * self.row(group, dkv)
        kv1 = 2 * self.row(c1, self.dt)
        # pass 1: modulate; k/v GEMM and the k norm (h alive); RoPE (table built, k rotated, v alive)
        pass1 = max(self.modulate(c1, 2),
                    self.row(c1, self.d) + kv1 + self.norm(c1, self.dt),
                    kv1 + self.row(c1, self.dt) + self.rope_table(c1) + max(self._rope_step(c1), self._rotate(c1)))
        if u > 1:  # K/V batched and packed rank-major for the all-to-all, the previous chunk's still in
            # flight (sent and received), the fused output (v's base), normed and rotated k
            pass1 = max(pass1, kv1 + 2 * self.row(c1, self.dt) + 2 * kv1 + 2 * kv1)
        pass1 += self._walk(c1, 2)
        # pass 2: per query chunk (h alive throughout): q GEMM + norm, RoPE, attention, output
        cq = c2 * u  # queries of the chunk from the whole Ulysses group, on this rank's heads
        attend = self.row(cq, dkv)
        if self.kv_offload:  # fp32 running output, a block's output in fp32 and weighted, the fp32
            # log-sum-exps (running, the block's, their merge and weights: per head, not per channel)
            lse = self.row(cq, self.heads // self.tp // u, FP32)
            blocks = -(-group // _chunk(group, plan.kv_block_tokens))
            attend += 3 * self.row(cq, dkv, FP32) + 5 * lse if blocks > 1 else self.row(cq, dkv, FP32) + 2 * lse
        if u > 1:  # the query chunk packed, received, the output buffer, its way back
            attend += 3 * self.row(c2, self.dt)
        q = max(self.row(c2, self.dt) + self.norm(c2, self.dt),
                self.row(c2, self.dt) + self.rope_table(c2) + max(self._rope_step(c2), self._rotate(c2)),
                self.row(c2, self.dt) + attend,
                attend + self.row(c2, self.d))
        chunks2 = len(range(0, n, c2)) if c2 else 1
        pass2 = self._pending(c2, chunks2, 1) + max(self.modulate(c2, 2), self.row(c2, self.d) + q)
        pass2 += self._walk(c2, 3)
        return keys + max(pass1, pass2)

    def _one_pass(self) -> int:
        """q, k, v of every token of this rank at once (the fused GEMM's output stays alive as v's
        base), then attention over all of them; the output projection per chunk."""
        plan, n = self.plan, self.n
        c1 = _chunk(n, plan.attn_chunk_tokens)
        c2 = _out_chunk(plan, n, plan.attn_chunk_tokens)
        rows = self.row(n, self.dt)
        # per projected chunk (all tokens when one): h, the fused output, q and k normed, RoPE of q
        # then of k (the normed q alive until both are rotated)
        h, fused, qk = self.row(c1, self.d), 3 * self.row(c1, self.dt), 2 * self.row(c1, self.dt)
        step = max(self.modulate(c1, 2), h + fused + self.norm_pair(c1),
                   h + fused + qk + self.rope_table(c1) + max(self._rope_step(c1),
                                                             self.row(c1, self.dt) + self._rotate(c1)))
        if c1 < n:  # stitched into q, k, v buffers for all tokens
            project, after = 3 * rows + step, 3 * rows
        else:
            project, after = step, 5 * rows  # rotated q, k; the fused output (v's base)
        if self.split and self.ring > 1:  # ring: this rank's K/V block and the arriving one, an fp32
            # accumulator for every query, a query chunk's block output and its fp32 merge, the output
            attend = after + 2 * 2 * rows + self.row(n, self.dt, FP32) \
                + max(self.row(c1, self.dt) + 2 * self.row(c1, self.dt, FP32), rows)
        elif self.split:  # Ulysses: q, k, v packed and received per head group, the output's way back
            attend = after + 3 * rows + 3 * rows + 2 * rows
        else:
            attend = after + rows
        chunks2 = len(range(0, n, c2)) if c2 else 1
        out = after - 2 * rows + rows + self._pending(c2, chunks2, 1) + 2 * self.row(c2, self.d)
        return max(project, attend, out)

    def text_attention(self) -> int:
        cfg, plan, n = self.cfg, self.plan, self.n
        c = _out_chunk(plan, n, plan.attn_chunk_tokens)
        s = self.shape.text_tokens
        keys = 3 * self.row(s, self.dt)  # the fused k/v output (v's base) and the normed k
        adaln = cfg.cross_attention_adaln
        k = 3 if adaln else 0
        chunks = len(range(0, n, c)) if c else 1
        h = self.modulate(c, 3) if adaln else 2 * self.row(c, self.d)
        held = self.row(c, self.d) + self.ada(c, k)  # h, and the gate's AdaLN values
        branch = max(h, held + max(self.row(c, self.dt) + self.norm(c, self.dt),
                                   2 * self.row(c, self.dt), self.row(c, self.dt) + self.row(c, self.d)))
        return keys + self._pending(c, chunks, k) + branch + self._walk(c, 3)

    def feedforward(self) -> int:
        cfg, plan, n = self.cfg, self.plan, self.n
        c = _out_chunk(plan, n, plan.ffn_chunk_tokens)
        wide = self.row(c, self.d * cfg.ff_mult // self.tp)
        chunks = len(range(0, n, c)) if c else 1
        held = self.ada(c, 3) + self.row(c, self.d)  # the gate's AdaLN values, h
        branch = max(self.modulate(c, 3), held + 2 * wide, held + wide + self.row(c, self.d))
        return self._pending(c, chunks, 3) + branch + self._walk(c, 3)

    def output(self) -> int:
        """The final modulation and projection per chunk into the (B, n, C) output; under SP the
        all-gather (padded parts, one buffer per rank, the concatenation)."""
        cfg, plan, n = self.cfg, self.plan, self.n
        c = _chunk(n, plan.ffn_chunk_tokens)
        ch = cfg.out_channels if self.video else cfg.audio_out_channels
        out = self.row(n, ch)
        step = 6 * self.row(c, self.d) if self.shape.per_token_timesteps else 3 * self.row(c, self.d)
        gather = 0
        if self.split:
            sp = self.shape.ulysses * self.shape.ring
            gather = out + sp * out + sp * out
        return out + max(step + self._walk(c, 2), gather)


def _av_phase(cfg: LTX2Config, plan, shape: StepShape) -> int:
    """a<->v cross-attention: the audio side whole (normed, its K/V for video queries, its queries
    and fp32 merge for video keys), the video side one chunk at a time (normed; v2a's keys from it,
    then a2v's queries and output)."""
    v, a = _Stream(cfg, shape, plan, True), _Stream(cfg, shape, plan, False)
    na, n = shape.audio_tokens, shape.video_tokens
    c = _out_chunk(plan, n, plan.attn_chunk_tokens)
    dx = cfg.audio_inner_dim // shape.tp  # a<->v attention width per rank (audio heads)
    xr = 0 if plan.cache_rope else _rope_table(na, cfg.audio_cross_attention_dim, shape.tp, cfg.rope_type,
                                               shape.dtype_bytes, shape.batch)
    audio_side = a.row(na, a.d) + xr + 3 * a.row(na, dx) + a.row(na, a.d) + a.row(na, dx) + 2 * a.row(na, dx, FP32)
    rope = 0
    if not plan.cache_rope:
        rope = _rope_compute(c, cfg.audio_cross_attention_dim, shape.tp, cfg.rope_type, shape.dtype_bytes, shape.batch)
    chunks = len(range(0, n, c)) if c else 1
    v2a = 4 * v.row(c, dx) + v.norm(c, dx) + 2 * a.row(na, dx, FP32)
    a2v = v.row(c, v.d) + max(v.row(c, dx) + v.norm(c, dx), 2 * v.row(c, dx), v.row(c, dx) + v.row(c, v.d))
    chunk = v.row(c, v.d) + max(rope, xr and 0) + max(v2a, a2v)
    return audio_side + v._pending(c, chunks, 0) + chunk + v._walk(c, 3)
