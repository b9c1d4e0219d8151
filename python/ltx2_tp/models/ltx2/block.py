"""One LTX-2 audio-video transformer block, processed in token chunks.

Order and arithmetic follow ltx-core's BasicAVTransformerBlock:
  video: self-attn -> text cross-attn;  audio: self-attn -> text cross-attn;
  a<->v cross-attn (both directions read the streams as they were before either update);
  video FFN;  audio FFN.
Each sub-layer is ltx-core's `x = x + layer(modulate(norm(x))) * gate`, walked in token chunks by
chunked.py's `add_residual` (which also overlaps each chunk's TP all-reduce with the next chunk):
modulation values, RoPE and the 4D-wide FFN activation exist for one chunk at a time, and the
residual stream is updated in place. Video tokens may be split over the SP ranks (attention over
the whole sequence is distributed/sequence.py's); audio (25 tokens/s) is whole on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.distributed.sequence import SequenceLayout, SplitKeyAttention, self_attention, self_attention_keys
from ltx2_tp.layers.adaln import TokenModulation, ada_values
from ltx2_tp.layers.attention import Attention
from ltx2_tp.layers.attention_backend import attention
from ltx2_tp.layers.feedforward import FeedForward
from ltx2_tp.layers.norm import rms_norm
from ltx2_tp.layers.rope import StreamRope, apply_rope
from ltx2_tp.memory.offload import HostTokens, rows
from ltx2_tp.memory.plan import ExecutionPlan, token_chunks
from ltx2_tp.models.ltx2.chunked import add_residual, stitch
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.inputs import (SKIP_A2V, SKIP_AUDIO_SELF_ATTN, SKIP_V2A, SKIP_VIDEO_SELF_ATTN,
                                        BlockSkips)
from ltx2_tp.profiling import nvtx_range

if TYPE_CHECKING:
    from ltx2_tp.layers.windowed_attention import TemporalWindow


@dataclass
class StreamState:
    """One modality inside a forward: this rank's tokens and everything per-forward about them."""

    x: "torch.Tensor | HostTokens"  # (B, n_local, D) residual stream, updated in place (or parked in host memory)
    mod: TokenModulation  # AdaLN rows (k x D per token)
    embedded: TokenModulation  # embedded timestep rows for the output modulation (D per token)
    rope: StreamRope
    context: torch.Tensor  # (U, S, D) text: one row per distinct context (U = B unless context_index)
    context_index: torch.Tensor | None  # (B,) each row's context row; None: U = B, row i's is row i
    context_mask: torch.Tensor | None  # additive (B, 1, 1, S)
    layout: SequenceLayout  # which tokens this rank holds
    enabled: bool
    prompt_mod: torch.Tensor | None = None  # (B, 1, 2D) cross-attention AdaLN of the prompt
    cross_rope: StreamRope | None = None  # temporal RoPE for a<->v attention
    cross_ss: torch.Tensor | None = None  # (B, 1, 4D) a<->v scale/shift timestep
    cross_gate: torch.Tensor | None = None  # (B, 1, D) a<->v gate timestep
    self_mask: torch.Tensor | None = None  # additive (B, 1, T, T), sp_size=1 only
    window: "TemporalWindow | None" = None  # opt-in temporal-window approximation of self-attention
    offload: bool = False  # follows the plan's offload tiers (video; audio, 25 tokens/s, stays resident)

    @property
    def total(self) -> int:
        return self.layout.total


def _modulate(x: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, eps) * (1 + scale) + shift


class AVTransformerBlock(nn.Module):
    def __init__(self, idx: int, cfg: LTX2Config, ctx: ParallelContext):
        super().__init__()
        self.idx, self.cfg, self.ctx = idx, cfg, ctx
        eps, gated, k = cfg.norm_eps, cfg.apply_gated_attention, cfg.adaln_coefficient
        if cfg.has_video:
            d, h, dh = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
            self.attn1 = Attention(d, h, dh, None, eps, gated, ctx)
            self.attn2 = Attention(d, h, dh, cfg.cross_attention_dim, eps, gated, ctx)
            self.ff = FeedForward(d, cfg.ff_mult, cfg.ff_bias, ctx)
            self.scale_shift_table = nn.Parameter(torch.empty(k, d))
        if cfg.has_audio:
            d, h, dh = cfg.audio_inner_dim, cfg.audio_num_attention_heads, cfg.audio_attention_head_dim
            self.audio_attn1 = Attention(d, h, dh, None, eps, gated, ctx)
            self.audio_attn2 = Attention(d, h, dh, cfg.audio_cross_attention_dim, eps, gated, ctx)
            self.audio_ff = FeedForward(d, cfg.ff_mult, cfg.audio_ff_bias, ctx)
            self.audio_scale_shift_table = nn.Parameter(torch.empty(k, d))
        if cfg.has_video and cfg.has_audio:
            vd, ad = cfg.inner_dim, cfg.audio_inner_dim
            ah, adh = cfg.audio_num_attention_heads, cfg.audio_attention_head_dim
            self.audio_to_video_attn = Attention(vd, ah, adh, ad, eps, gated, ctx)  # q video, kv audio
            self.video_to_audio_attn = Attention(ad, ah, adh, vd, eps, gated, ctx)  # q audio, kv video
            self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.empty(5, ad))
            self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.empty(5, vd))
        if cfg.cross_attention_adaln:
            if cfg.has_video:
                self.prompt_scale_shift_table = nn.Parameter(torch.empty(2, cfg.inner_dim))
            if cfg.has_audio:
                self.audio_prompt_scale_shift_table = nn.Parameter(torch.empty(2, cfg.audio_inner_dim))

    # ---------------------------------------------------------------------------------------
    def forward(self, video: StreamState | None, audio: StreamState | None, skips: BlockSkips,
                plan: ExecutionPlan) -> None:
        run_v = video is not None and video.enabled and video.total > 0
        run_a = audio is not None and audio.enabled and audio.total > 0
        with nvtx_range("block", self.idx):
            if run_v:
                self._self_attention(self.attn1, video, self.scale_shift_table, skips, SKIP_VIDEO_SELF_ATTN, plan)
                self._text_attention(self.attn2, video, self.scale_shift_table,
                                     getattr(self, "prompt_scale_shift_table", None), plan)
            if run_a:
                self._self_attention(self.audio_attn1, audio, self.audio_scale_shift_table, skips,
                                     SKIP_AUDIO_SELF_ATTN, plan)
                self._text_attention(self.audio_attn2, audio, self.audio_scale_shift_table,
                                     getattr(self, "audio_prompt_scale_shift_table", None), plan)
            run_a2v = run_v and audio is not None and audio.total > 0
            run_v2a = run_a and video is not None and video.total > 0
            if run_a2v or run_v2a:
                self._av_cross_attention(video, audio, run_a2v, run_v2a, skips, plan)
            if run_v:
                self._feedforward(self.ff, video, self.scale_shift_table, plan)
            if run_a:
                self._feedforward(self.audio_ff, audio, self.audio_scale_shift_table, plan)

    # ---------------------------------------------------------------------------------------
    def _self_attention(self, attn: Attention, st: StreamState, table, skips, kind: str, plan: ExecutionPlan) -> None:
        """x = x + attn(modulate(norm(x))) * gate, attention over the whole (maybe SP-split) sequence.
        STG: samples that skip this attention pass its value projection through instead.
        Queries within one attention chunk (up to 1080p x 121 at the default budget): one pass,
        q/k/v from one fused GEMM. More: two passes, so that the step holds the residual, K, V
        and one chunk (ring attention, which passes whole K/V blocks around, stays in one pass)."""
        with nvtx_range("self_attention"):
            ring = st.layout.split and self.ctx.ring_size > 1
            if plan.two_pass(max(st.layout.sizes), plan.kv_offload and st.offload) and not ring:
                self._self_attention_two_pass(attn, st, table, skips, kind, plan)
            else:
                self._self_attention_one_pass(attn, st, table, skips, kind, plan)

    def _self_attention_one_pass(self, attn: Attention, st: StreamState, table, skips, kind: str,
                                 plan: ExecutionPlan) -> None:
        x, n = st.x, st.x.shape[1]
        skip_all = skips.all_in_batch(kind)
        chunks = token_chunks(n, plan.attn_chunk_tokens)
        walk = rows(x, chunks)

        def modulated(s, e):  # the AdaLN values die here, not alive under the projection
            shift, scale = ada_values(table, st.mod, s, e, slice(0, 2))
            return _modulate(walk.load(s, e), self.cfg.norm_eps, scale, shift)

        def project(s, e):
            h = modulated(s, e)
            if skip_all:
                return None, None, attn.v_only(h), attn.gates(h)
            q, k, v = attn.qkv(h)
            cos, sin = st.rope(s, e)
            return self._rope(q, cos, sin), self._rope(k, cos, sin), v, attn.gates(h)

        q, k, v, gates = stitch(n, chunks, project)
        if skip_all:
            o = v
        else:
            o = self_attention(q, k, v, st.layout, self.ctx, plan.attn_chunk_tokens, st.self_mask,
                               plan.ulysses_head_groups, st.window)
            del q, k
            if skips.any_in_batch(kind):
                m = skips.mask(kind).view(-1, 1, 1, 1)
                o = o * m + v * (1 - m)

        def out(s, e, xc):
            (gate,) = ada_values(table, st.mod, s, e, slice(2, 3))
            return attn.out_start(o[:, s:e], None if gates is None else gates[:, s:e]), gate

        add_residual(x, plan.out_chunks(n, plan.attn_chunk_tokens), out)

    def _self_attention_two_pass(self, attn: Attention, st: StreamState, table, skips, kind: str,
                                 plan: ExecutionPlan) -> None:
        """Pass 1: K and V of every token of this rank, chunk by chunk, into the keys' store (under
        Ulysses through its all-to-all). Pass 2, per query chunk: q, attention against all keys,
        output projection, gate, in-place residual update. Under TP the k and q norms each
        all-reduce their own squares (tokens x 1, one per chunk and pass)."""
        eps = self.cfg.norm_eps

        def modulated(s, e, xc):
            shift, scale = ada_values(table, st.mod, s, e, slice(0, 2))
            return _modulate(xc, eps, scale, shift)

        def gated(s, e, o, h):
            (gate,) = ada_values(table, st.mod, s, e, slice(2, 3))
            return attn.out_start(o, attn.gates(h)), gate

        if skips.all_in_batch(kind):  # every sample passes v through: no keys, no collectives
            def value(s, e, xc):
                h = modulated(s, e, xc)
                return gated(s, e, attn.v_only(h), h)

            add_residual(st.x, plan.out_chunks(st.x.shape[1], plan.attn_chunk_tokens), value)
            return
        keys = self_attention_keys(st.layout, self.ctx, plan, st.self_mask, plan.kv_offload and st.offload, st.window)
        walk = rows(st.x, keys.pass1)
        for s, e in keys.pass1:
            k, v = attn.kv(modulated(s, e, walk.load(s, e)))
            keys.add(self._rope(k, *st.rope(s, e)), v)
            del k, v  # not alive under the next chunk's projection
        keys.finish()
        del walk  # its chunk slots (a parked residual)
        m = None
        if skips.any_in_batch(kind):  # these samples pass v through (recomputed per chunk)
            m = skips.mask(kind).view(-1, 1, 1, 1)

        def query(s, e, xc):
            h = modulated(s, e, xc)
            o = keys.attend(self._rope(attn.q(h), *st.rope(s, e)))
            if m is not None:
                o = o * m + attn.v_only(h) * (1 - m)
            return gated(s, e, o, h)

        add_residual(st.x, keys.pass2, query)

    def _text_attention(self, attn: Attention, st: StreamState, table, prompt_table, plan: ExecutionPlan) -> None:
        """x = x + attn(norm(x), text); with cross-attention AdaLN the query is modulated, the text
        modulated by the prompt's sigma, and the output gated."""
        x, eps, adaln = st.x, self.cfg.norm_eps, self.cfg.cross_attention_adaln
        k, v = attn.kv(_modulate_prompt(st, prompt_table) if adaln else st.context)
        if st.context_index is not None:  # K/V computed once per distinct context, then one per row
            k, v = k.index_select(0, st.context_index), v.index_select(0, st.context_index)

        def branch(s, e, xc):
            if adaln:
                shift, scale, gate = ada_values(table, st.mod, s, e, slice(6, 9))
                h = _modulate(xc, eps, scale, shift)
            else:
                h, gate = rms_norm(xc, eps), None
            return attn.out_start(attention(attn.q(h), k, v, st.context_mask), attn.gates(h)), gate

        with nvtx_range("text_attention"):
            add_residual(x, plan.out_chunks(x.shape[1], plan.attn_chunk_tokens), branch)

    def _av_cross_attention(self, video: StreamState, audio: StreamState, run_a2v: bool, run_v2a: bool,
                            skips, plan: ExecutionPlan) -> None:
        """vx = vx + a2v(video queries, audio keys) * gate and ax = ax + v2a(audio queries, video keys)
        * gate, both reading the streams as they were before either update. Audio is whole on
        every rank: its side is computed once. Video is walked in chunks: each chunk is read
        (normed) before its own a2v update, and serves v2a as keys too."""
        do_a2v = run_a2v and not skips.all_in_batch(SKIP_A2V)
        do_v2a = run_v2a and not skips.all_in_batch(SKIP_V2A)
        if not (do_a2v or do_v2a):
            return
        with nvtx_range("av_cross_attention"):
            audio_norm, audio_rope = rms_norm(audio.x, self.cfg.norm_eps), audio.cross_rope(0, audio.x.shape[1])
            a2v = self._audio_to_video(video, audio, audio_norm, audio_rope, skips) if do_a2v else None
            v2a = self._video_to_audio(video, audio, audio_norm, audio_rope, skips) if do_v2a else None
            chunks = plan.out_chunks(video.x.shape[1], plan.attn_chunk_tokens)

            def video_side(s, e, xc):  # this video chunk as both directions read it
                return rms_norm(xc, self.cfg.norm_eps), video.cross_rope(s, e)

            def branch(s, e, xc):
                vn, rope = video_side(s, e, xc)
                if v2a is not None:
                    v2a.add_keys(vn, rope)
                return a2v.output(vn, rope)

            if a2v is not None:
                add_residual(video.x, chunks, branch)
            else:
                walk = rows(video.x, chunks)
                for s, e in chunks:
                    v2a.add_keys(*video_side(s, e, walk.load(s, e)))
            if v2a is not None:
                audio.x += v2a.output()

    def _audio_to_video(self, video: StreamState, audio: StreamState, audio_norm, audio_rope, skips) -> "_AudioToVideo":
        scale_v, shift_v, gate = _av_ada(self.scale_shift_table_a2v_ca_video, video, slice(0, 2))
        scale_a, shift_a, _ = _av_ada(self.scale_shift_table_a2v_ca_audio, audio, slice(0, 2))
        attn = self.audio_to_video_attn
        k, v = attn.kv(audio_norm * (1 + scale_a) + shift_a)
        return _AudioToVideo(attn, self._rope(k, *audio_rope), v, scale_v, shift_v,
                             _gate_skipping(gate, skips, SKIP_A2V), self.cfg.rope_type)

    def _video_to_audio(self, video: StreamState, audio: StreamState, audio_norm, audio_rope, skips) -> "_VideoToAudio":
        scale_a, shift_a, gate = _av_ada(self.scale_shift_table_a2v_ca_audio, audio, slice(2, 4))
        scale_v, shift_v, _ = _av_ada(self.scale_shift_table_a2v_ca_video, video, slice(2, 4))
        attn = self.video_to_audio_attn
        q_in = audio_norm * (1 + scale_a) + shift_a
        q = SplitKeyAttention(self._rope(attn.q(q_in), *audio_rope), video.layout, self.ctx)
        return _VideoToAudio(attn, q_in, q, scale_v, shift_v, _gate_skipping(gate, skips, SKIP_V2A),
                             self.cfg.rope_type)

    def _feedforward(self, ff: FeedForward, st: StreamState, table, plan: ExecutionPlan) -> None:
        """x = x + ff(modulate(norm(x))) * gate."""
        def branch(s, e, xc):
            shift, scale, gate = ada_values(table, st.mod, s, e, slice(3, 6))
            return ff.start(_modulate(xc, self.cfg.norm_eps, scale, shift)), gate

        add_residual(st.x, plan.out_chunks(st.x.shape[1], plan.ffn_chunk_tokens), branch)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(t, cos, sin, self.cfg.rope_type)


@dataclass
class _AudioToVideo:
    """a2v: video queries, one chunk at a time; audio keys and values, whole, computed once."""

    attn: Attention
    k: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor
    q_shift: torch.Tensor
    gate: torch.Tensor
    rope_type: str

    def output(self, video_norm: torch.Tensor, rope) -> tuple:
        """The chunk's update in flight and its gate (add_residual's branch)."""
        q_in = video_norm * (1 + self.q_scale) + self.q_shift
        q = apply_rope(self.attn.q(q_in), *rope, self.rope_type)
        return self.attn.out_start(attention(q, self.k, self.v), self.attn.gates(q_in)), self.gate


@dataclass
class _VideoToAudio:
    """v2a: audio queries, whole; video keys and values, one chunk at a time (this rank's part)."""

    attn: Attention
    q_in: torch.Tensor  # the modulated audio (the gate logits read it too)
    attention: SplitKeyAttention
    k_scale: torch.Tensor
    k_shift: torch.Tensor
    gate: torch.Tensor
    rope_type: str

    def add_keys(self, video_norm: torch.Tensor, rope) -> None:
        k, v = self.attn.kv(video_norm * (1 + self.k_scale) + self.k_shift)
        self.attention.add(apply_rope(k, *rope, self.rope_type), v)

    def output(self) -> torch.Tensor:
        """The gated update of the audio stream (after every chunk's keys were added)."""
        return self.attn.out(self.attention.result(), self.attn.gates(self.q_in)) * self.gate


def _modulate_prompt(st: StreamState, prompt_table: torch.Tensor) -> torch.Tensor:
    """The text context under cross-attention AdaLN: scaled and shifted by the prompt's sigma."""
    b, pm = st.context.shape[0], st.prompt_mod  # prompt_mod has the context's rows
    t = prompt_table[None, None].to(device=st.x.device, dtype=st.x.dtype)
    shift, scale = (t + pm.reshape(b, pm.shape[1], 2, -1)).unbind(dim=2)
    return st.context * (1 + scale) + shift


def _gate_skipping(gate: torch.Tensor, skips: BlockSkips, kind: str) -> torch.Tensor:
    """The gate with zeros for the samples that skip this attention (0 / 1 per sample: folding it
    into the gate is exact). No sample skips: the gate as it is (no multiply)."""
    if not skips.any_in_batch(kind):
        return gate
    return gate * skips.mask(kind).view(-1, 1, 1)


def _av_ada(table: torch.Tensor, st: StreamState, sl: slice):
    """ltx-core get_av_ca_ada_values: (scale, shift) from rows 0-3 and the gate from row 4."""
    b = st.cross_ss.shape[0]
    t = table.to(device=st.cross_ss.device, dtype=st.cross_ss.dtype)
    ss = t[:4][sl][None, None] + st.cross_ss.reshape(b, st.cross_ss.shape[1], 4, -1)[:, :, sl]
    gate = t[4:][None, None] + st.cross_gate.reshape(b, st.cross_gate.shape[1], 1, -1)
    scale, shift = ss.unbind(dim=2)
    return scale, shift, gate.squeeze(2)
