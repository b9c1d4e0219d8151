"""One LTX-2 audio-video transformer block, processed in token chunks.

Order and arithmetic follow ltx-core's BasicAVTransformerBlock:
  video: self-attn -> text cross-attn;  audio: self-attn -> text cross-attn;
  a<->v cross-attn (both directions read the streams as they were before either update);
  video FFN;  audio FFN.
Every sub-layer walks its stream in token chunks: modulation values, RoPE and the 4D-wide FFN
activation exist for one chunk at a time, and the residual stream is updated in place.
Audio (25 tokens/s) is never split across SP ranks; video is, and audio queries attending to
split video keys merge their partial results across the SP group by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ltx2_tp.distributed.collectives import all_reduce_max, all_reduce_sum
from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.distributed.ulysses import SequenceLayout, local_attention, sp_self_attention
from ltx2_tp.layers.adaln import TokenModulation, ada_values
from ltx2_tp.layers.attention import Attention
from ltx2_tp.layers.attention_backend import LseAccumulator, attention, attention_lse
from ltx2_tp.layers.feedforward import FeedForward
from ltx2_tp.layers.norm import rms_norm
from ltx2_tp.layers.rope import StreamRope, apply_rope
from ltx2_tp.memory.plan import ExecutionPlan, token_chunks
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.inputs import SKIP_A2V, SKIP_AUDIO_SELF_ATTN, SKIP_V2A, SKIP_VIDEO_SELF_ATTN
from ltx2_tp.profiling import nvtx_range


@dataclass
class StreamState:
    """One modality inside a forward: this rank's tokens and everything per-forward about them."""

    x: torch.Tensor  # (B, n_local, D) residual stream, updated in place
    mod: TokenModulation  # AdaLN rows (k x D per token)
    embedded: TokenModulation  # embedded timestep rows for the output modulation (D per token)
    rope: StreamRope
    context: torch.Tensor  # (B, S, D) text
    context_mask: torch.Tensor | None  # additive (B, 1, 1, S)
    layout: SequenceLayout
    split: bool  # tokens split across SP ranks
    enabled: bool
    prompt_mod: torch.Tensor | None = None  # (B, 1, 2D) cross-attention AdaLN of the prompt
    cross_rope: StreamRope | None = None  # temporal RoPE for a<->v attention
    cross_ss: torch.Tensor | None = None  # (B, 1, 4D) a<->v scale/shift timestep
    cross_gate: torch.Tensor | None = None  # (B, 1, D) a<->v gate timestep
    self_mask: torch.Tensor | None = None  # additive (B, 1, T, T), sp_size=1 only

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
    def forward(self, video: StreamState | None, audio: StreamState | None, pert, plan: ExecutionPlan) -> None:
        run_v = video is not None and video.enabled and video.total > 0
        run_a = audio is not None and audio.enabled and audio.total > 0
        with nvtx_range("block", self.idx):
            if run_v:
                self._self_attention(self.attn1, video, self.scale_shift_table, pert, SKIP_VIDEO_SELF_ATTN, plan)
                self._text_attention(self.attn2, video, self.scale_shift_table,
                                     getattr(self, "prompt_scale_shift_table", None), plan)
            if run_a:
                self._self_attention(self.audio_attn1, audio, self.audio_scale_shift_table, pert,
                                     SKIP_AUDIO_SELF_ATTN, plan)
                self._text_attention(self.audio_attn2, audio, self.audio_scale_shift_table,
                                     getattr(self, "audio_prompt_scale_shift_table", None), plan)
            run_a2v = run_v and audio is not None and audio.total > 0
            run_v2a = run_a and video is not None and video.total > 0
            if run_a2v or run_v2a:
                self._av_cross_attention(video, audio, run_a2v, run_v2a, pert, plan)
            if run_v:
                self._feedforward(self.ff, video, self.scale_shift_table, plan)
            if run_a:
                self._feedforward(self.audio_ff, audio, self.audio_scale_shift_table, plan)

    # ---------------------------------------------------------------------------------------
    def _self_attention(self, attn: Attention, st: StreamState, table, pert, kind: str, plan: ExecutionPlan) -> None:
        with nvtx_range("self_attention"):
            eps, x = self.cfg.norm_eps, st.x
            b, n = x.shape[:2]
            chunks = token_chunks(n, plan.attn_chunk_tokens)
            skip_all = pert.all_in_batch(kind, self.idx)
            partial = not skip_all and pert.any_in_batch(kind, self.idx)
            shape = (b, n, attn.heads_local, attn.dim_head)
            single = len(chunks) == 1  # then the projections are used as they are, no copies
            q = k = v = gates = None
            if not single:  # chunks write into this rank's whole-sequence buffers (tokens x D each)
                v = x.new_empty(shape)
                q, k = (None, None) if skip_all else (x.new_empty(shape), x.new_empty(shape))
                if attn.to_gate_logits is not None:
                    gates = x.new_empty(b, n, attn.heads_local)
            for s, e in chunks:
                shift, scale = ada_values(table, st.mod, s, e, slice(0, 2))
                h = _modulate(x[:, s:e], eps, scale, shift)
                qc = kc = None
                if skip_all:
                    vc = attn.v_only(h)
                else:
                    qc, kc, vc = attn.qkv(h)
                    cos, sin = st.rope(s, e)
                    qc = apply_rope(qc, cos, sin, self.cfg.rope_type)
                    kc = apply_rope(kc, cos, sin, self.cfg.rope_type)
                gc = attn.gates(h)
                if single:
                    q, k, v, gates = qc, kc, vc, gc
                    continue
                v[:, s:e] = vc
                if qc is not None:
                    q[:, s:e], k[:, s:e] = qc, kc
                if gc is not None:
                    gates[:, s:e] = gc
            if skip_all:
                o = v
            else:
                if st.split:
                    o = sp_self_attention(q, k, v, st.layout, self.ctx, plan.attn_chunk_tokens, st.self_mask,
                                          plan.ulysses_head_groups)
                else:
                    o = local_attention(q, k, v, plan.attn_chunk_tokens, st.self_mask)
                del q, k
                if partial:
                    m = pert.mask(kind, self.idx, x.device, x.dtype).view(b, 1, 1, 1)
                    o = o * m + v * (1 - m)

            def out(s, e):
                (gate,) = ada_values(table, st.mod, s, e, slice(2, 3))
                p = attn.out_start(o[:, s:e], None if gates is None else gates[:, s:e])
                return lambda: x[:, s:e].add_(p.wait() * gate)

            _pipelined(plan.out_chunks(n, plan.attn_chunk_tokens), out)

    def _text_attention(self, attn: Attention, st: StreamState, table, prompt_table, plan: ExecutionPlan) -> None:
        with nvtx_range("text_attention"):
            eps, x = self.cfg.norm_eps, st.x
            adaln = self.cfg.cross_attention_adaln
            context = st.context
            if adaln:
                b = x.shape[0]
                pt = prompt_table[None, None].to(device=x.device, dtype=x.dtype)
                shift_kv, scale_kv = (pt + st.prompt_mod.reshape(b, st.prompt_mod.shape[1], 2, -1)).unbind(dim=2)
                context = context * (1 + scale_kv) + shift_kv
            k, v = attn.kv(context)

            def chunk(s, e):
                gate = None
                if adaln:
                    shift_q, scale_q, gate = ada_values(table, st.mod, s, e, slice(6, 9))
                    h = _modulate(x[:, s:e], eps, scale_q, shift_q)
                else:
                    h = rms_norm(x[:, s:e], eps)
                p = attn.out_start(attention(attn.q(h), k, v, st.context_mask), attn.gates(h))
                return lambda: x[:, s:e].add_(p.wait() * gate if adaln else p.wait())

            _pipelined(plan.out_chunks(x.shape[1], plan.attn_chunk_tokens), chunk)

    def _av_cross_attention(self, video: StreamState, audio: StreamState, run_a2v: bool, run_v2a: bool,
                            pert, plan: ExecutionPlan) -> None:
        with nvtx_range("av_cross_attention"):
            eps, rope_type = self.cfg.norm_eps, self.cfg.rope_type
            vx, ax = video.x, audio.x
            do_a2v = run_a2v and not pert.all_in_batch(SKIP_A2V, self.idx)
            do_v2a = run_v2a and not pert.all_in_batch(SKIP_V2A, self.idx)
            if not (do_a2v or do_v2a):
                return
            vt, at = self.scale_shift_table_a2v_ca_video, self.scale_shift_table_a2v_ca_audio
            ax_norm = rms_norm(ax, eps)
            a_cos, a_sin = audio.cross_rope(0, ax.shape[1])
            if do_a2v:  # video queries, audio keys (audio is whole on every rank)
                a2v = self.audio_to_video_attn
                scale_v, shift_v, gate_a2v = _av_ada(vt, video, slice(0, 2))
                scale_a, shift_a, _ = _av_ada(at, audio, slice(0, 2))
                ka, va = a2v.kv(ax_norm * (1 + scale_a) + shift_a)
                ka = apply_rope(ka, a_cos, a_sin, rope_type)
                mask_a2v = _skip_mask(pert, SKIP_A2V, self.idx, vx)
                if mask_a2v is not None:  # 0 / 1 per sample: folding it into the gate is exact
                    gate_a2v = gate_a2v * mask_a2v
            if do_v2a:  # audio queries, video keys (video may be split over SP ranks)
                v2a = self.video_to_audio_attn
                scale_a2, shift_a2, gate_v2a = _av_ada(at, audio, slice(2, 4))
                scale_v2, shift_v2, _ = _av_ada(vt, video, slice(2, 4))
                qa_in = ax_norm * (1 + scale_a2) + shift_a2
                qa = apply_rope(v2a.q(qa_in), a_cos, a_sin, rope_type)
                acc = LseAccumulator()

            def chunk(s, e):
                vn = rms_norm(vx[:, s:e], eps)  # before this chunk's a2v update, as ltx-core
                v_cos, v_sin = video.cross_rope(s, e)
                if do_v2a:
                    kc, vc = v2a.kv(vn * (1 + scale_v2) + shift_v2)
                    acc.add(*attention_lse(qa, apply_rope(kc, v_cos, v_sin, rope_type), vc))
                if not do_a2v:
                    return None
                q_in = vn * (1 + scale_v) + shift_v
                qv = apply_rope(a2v.q(q_in), v_cos, v_sin, rope_type)
                p = a2v.out_start(attention(qv, ka, va), a2v.gates(q_in))
                return lambda: vx[:, s:e].add_(p.wait() * gate_a2v)

            _pipelined(plan.out_chunks(vx.shape[1], plan.attn_chunk_tokens), chunk)
            if do_v2a:
                o = _merge_over_sequence(acc, qa, video.split, self.ctx)
                mask_v2a = _skip_mask(pert, SKIP_V2A, self.idx, ax)
                if mask_v2a is not None:
                    gate_v2a = gate_v2a * mask_v2a
                ax += v2a.out(o, v2a.gates(qa_in)) * gate_v2a

    def _feedforward(self, ff: FeedForward, st: StreamState, table, plan: ExecutionPlan) -> None:
        eps, x = self.cfg.norm_eps, st.x

        def chunk(s, e):
            shift, scale, gate = ada_values(table, st.mod, s, e, slice(3, 6))
            p = ff.start(_modulate(x[:, s:e], eps, scale, shift))
            return lambda: x[:, s:e].add_(p.wait() * gate)

        _pipelined(plan.out_chunks(x.shape[1], plan.ffn_chunk_tokens), chunk)


def _pipelined(chunks: list[tuple[int, int]], issue) -> None:
    """`issue(s, e)` computes one token chunk up to its row-parallel all-reduce and returns the
    closure that waits for it and updates the stream. Each chunk is completed after the next one
    is issued, so its TP all-reduce runs under the next chunk's GEMMs. Chunks are disjoint token
    ranges, so completing chunk i late never changes what chunk i+1 reads."""
    done = None
    for s, e in chunks:
        nxt = issue(s, e)
        if done is not None:
            done()
        done = nxt
    if done is not None:
        done()


def _skip_mask(pert, kind: str, block: int, x: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, 1) zeros for the batch elements that skip this attention; None when none does (no
    multiply, and a compiled block does not specialise on its index)."""
    if not pert.any_in_batch(kind, block):
        return None
    return pert.mask(kind, block, x.device, x.dtype).view(-1, 1, 1)


def _av_ada(table: torch.Tensor, st: StreamState, sl: slice):
    """ltx-core get_av_ca_ada_values: (scale, shift) from rows 0-3 and the gate from row 4."""
    b = st.cross_ss.shape[0]
    t = table.to(device=st.cross_ss.device, dtype=st.cross_ss.dtype)
    ss = t[:4][sl][None, None] + st.cross_ss.reshape(b, st.cross_ss.shape[1], 4, -1)[:, :, sl]
    gate = t[4:][None, None] + st.cross_gate.reshape(b, st.cross_gate.shape[1], 1, -1)
    scale, shift = ss.unbind(dim=2)
    return scale, shift, gate.squeeze(2)


def _merge_over_sequence(acc: LseAccumulator, q: torch.Tensor, split: bool, ctx: ParallelContext) -> torch.Tensor:
    """Combine the audio queries' partial attention over this rank's video keys across SP ranks."""
    if acc.out is None:  # this rank holds no video tokens
        acc.out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        acc.lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    if not split or ctx.sp_size == 1:
        return acc.out.to(q.dtype)
    m = all_reduce_max(acc.lse.clone(memory_format=torch.contiguous_format), ctx.sp_group)
    w = torch.exp(acc.lse - m)  # (B, H, N)
    num = all_reduce_sum(acc.out * w.transpose(1, 2).unsqueeze(-1), ctx.sp_group)
    den = all_reduce_sum(w, ctx.sp_group)
    return (num / den.transpose(1, 2).unsqueeze(-1)).to(q.dtype)
