"""The LTX-2 audio-video diffusion transformer.

forward(video, audio, perturbations) -> (video velocity, audio velocity), as ltx-core's LTXModel.
forward(..., plan=ExecutionPlan(...)) runs with those chunk sizes; without one, the model derives a
plan per forward from the video tokens an SP rank holds, by the `PlanRule` it was built with.
Under sequence parallelism every rank receives the whole (small: C=128 channels) latent, keeps
its part of the video tokens, runs the blocks on it and all-gathers the (T x C) output, so the
caller sees exactly the single-GPU interface. Under tensor parallelism the layers own the
communication; this file has none but that final gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltx2_tp.distributed.collectives import gather_sequence
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.distributed.sequence import SequenceLayout
from ltx2_tp.latent_grid import tokens_per_rank
from ltx2_tp.layers.adaln import AdaLayerNormSingle, TokenModulation
from ltx2_tp.layers.rope import RopeSpec, StreamRope
from ltx2_tp.layers.windowed_attention import temporal_window
from ltx2_tp.memory.estimate import StepShape
from ltx2_tp.memory.offload import HostTokens, rows
from ltx2_tp.memory.plan import ExecutionPlan, PlanRule, token_chunks
from ltx2_tp.memory.residency import ALL_RESIDENT
from ltx2_tp.models.ltx2.block import AVTransformerBlock, StreamState
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.inputs import Modality, as_perturbations, device_constant, select_rows
from ltx2_tp.profiling import nvtx_range


class CaptionProjection(nn.Module):
    """PixArt-alpha text projection (LTX-2 19B keeps it in the transformer): linear, tanh-GELU, linear."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class LTX2Model(nn.Module):
    def __init__(self, cfg: LTX2Config, ctx: ParallelContext = SINGLE, plan_rule: PlanRule | None = None):
        super().__init__()
        cfg.validate_parallel(ctx.tp_size, ctx.ulysses_size)
        self.cfg, self.ctx = cfg, ctx
        self.plan_rule = plan_rule or PlanRule()
        k = cfg.adaln_coefficient
        if cfg.has_video:
            d = cfg.inner_dim
            self.patchify_proj = nn.Linear(cfg.in_channels, d)
            if cfg.caption_projection:
                self.caption_projection = CaptionProjection(cfg.caption_channels, d)
            self.adaln_single = AdaLayerNormSingle(d, k)
            if cfg.cross_attention_adaln:
                self.prompt_adaln_single = AdaLayerNormSingle(d, 2)
            self.scale_shift_table = nn.Parameter(torch.empty(2, d))
            self.proj_out = nn.Linear(d, cfg.out_channels)
        if cfg.has_audio:
            d = cfg.audio_inner_dim
            self.audio_patchify_proj = nn.Linear(cfg.audio_in_channels, d)
            if cfg.caption_projection:
                self.audio_caption_projection = CaptionProjection(cfg.caption_channels, d)
            self.audio_adaln_single = AdaLayerNormSingle(d, k)
            if cfg.cross_attention_adaln:
                self.audio_prompt_adaln_single = AdaLayerNormSingle(d, 2)
            self.audio_scale_shift_table = nn.Parameter(torch.empty(2, d))
            self.audio_proj_out = nn.Linear(d, cfg.audio_out_channels)
        if cfg.has_video and cfg.has_audio:
            self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(cfg.inner_dim, 4)
            self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(cfg.audio_inner_dim, 4)
            self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(cfg.inner_dim, 1)
            self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(cfg.audio_inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(AVTransformerBlock(i, cfg, ctx) for i in range(cfg.num_layers))
        self.residency = ALL_RESIDENT  # memory/swap.py's enable_block_swap streams blocks in instead

    # ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, video: Modality | None, audio: Modality | None, perturbations=None,
                plan: ExecutionPlan | None = None):
        cfg = self.cfg
        if video is not None and not cfg.has_video:
            raise ValueError("this model has no video stream (config has_video=False)")
        if audio is not None and not cfg.has_audio:
            raise ValueError("this model has no audio stream (config has_audio=False)")
        batch = (video if video is not None else audio).latent.shape[0]
        pert = as_perturbations(perturbations, batch)
        if plan is None:
            plan = self.execution_plan(*_step_tokens(video, audio))
        if plan.kv_offload and self.ctx.ring_size > 1:
            raise ValueError("kv_offload is not supported with ring attention (ring_size > 1): it passes whole "
                             "K/V blocks between GPUs in one pass")
        n = len(self.transformer_blocks)
        ref = (video if video is not None else audio).latent
        with nvtx_range("dit_forward"):
            start = 0
            # rows equal to another row until some block run from there (the residual stream parked
            # in host memory is not copied: no sharing under residual_offload)
            shared = None if plan.residual_offload else pert.shared_prefix(n)
            if shared is not None:
                lead = [select_rows(m, shared.leaders) for m in (video, audio)]
                v, a = self._prepare_streams(*lead, plan, pert.distinct_contexts(shared.leaders))
                self._run_blocks(v, a, pert.select(shared.leaders).per_block(n, ref.device, ref.dtype), plan, 0,
                                 shared.fork)
                start, prefix = shared.fork, (v, a)
            v, a = self._prepare_streams(video, audio, plan, pert.distinct_contexts(list(range(batch))))
            if shared is not None:
                index = device_constant(tuple(shared.index), ref.device, torch.int64)
                for st, done in zip((v, a), prefix):
                    if st is not None:
                        st.x = done.x.index_select(0, index)
                prefix = None  # the leaders' states: freed before the rest of the blocks run
            # each block's skips resolved here: the block never branches on its index (compile.py)
            self._run_blocks(v, a, pert.per_block(n, ref.device, ref.dtype), plan, start, n)
            vx = self._output("video", v, plan) if v is not None else None
            ax = self._output("audio", a, plan) if a is not None else None
        return vx, ax

    def _prepare_streams(self, video: Modality | None, audio: Modality | None, plan: ExecutionPlan,
                         contexts: tuple[list[int], list[int]] | None = None):
        """Both streams' states; `contexts` (Perturbations.distinct_contexts): the rows whose text
        context is kept, and each row's (the text K/V are computed once per distinct context)."""
        v = a = None
        if video is not None:  # split over the SP ranks
            v = self._prepare("video", video, audio, SequenceLayout.for_context(video.latent.shape[1], self.ctx), plan,
                              contexts)
        if audio is not None:  # 25 tokens/s: whole on every rank
            a = self._prepare("audio", audio, video, SequenceLayout.whole(audio.latent.shape[1]), plan, contexts)
        return v, a

    def _run_blocks(self, v, a, skips, plan: ExecutionPlan, start: int, stop: int) -> None:
        for i in range(start, stop):
            with self.residency.loaded(i):
                self.transformer_blocks[i](v, a, skips[i], plan)

    def execution_plan(self, video_tokens: int, audio_tokens: int = 0, text_tokens: int = 0, batch: int = 1,
                       per_token_timesteps: bool = True, dtype_bytes: int = 2) -> ExecutionPlan:
        """The plan a forward over `video_tokens` video tokens runs with when it is given none: the
        rule applied to the most tokens an SP rank holds, the same number on every rank (the plan
        also decides collectives, e.g. Ulysses head groups, whose count every rank must share)."""
        ctx = self.ctx
        shape = StepShape(tokens_per_rank(video_tokens, ctx.sp_size), audio_tokens, text_tokens, batch, ctx.tp_size,
                          ctx.ulysses_size, ctx.ring_size, per_token_timesteps, dtype_bytes)
        return self.plan_rule.for_step(self.cfg, shape)

    # ---------------------------------------------------------------------------------------
    def _names(self, kind: str) -> str:
        return "" if kind == "video" else "audio_"

    def _prepare(self, kind: str, m: Modality, cross: Modality | None, layout: SequenceLayout,
                 plan: ExecutionPlan, contexts: tuple[list[int], list[int]] | None = None) -> StreamState:
        cfg, p = self.cfg, self._names(kind)
        video = kind == "video"
        heads = cfg.num_attention_heads if video else cfg.audio_num_attention_heads
        inner = cfg.inner_dim if video else cfg.audio_inner_dim
        max_pos = cfg.positional_embedding_max_pos if video else cfg.audio_positional_embedding_max_pos
        b, total = m.latent.shape[:2]
        dtype = m.latent.dtype
        s0, e0 = layout.local_range
        mult = cfg.timestep_scale_multiplier

        x = self._patchify(getattr(self, f"{p}patchify_proj"), m.latent[:, s0:e0], video and plan.residual_offload, plan)
        ts = m.timesteps.reshape(b, -1)
        if ts.shape[1] == total:
            ts = ts[:, s0:e0]
        elif ts.shape[1] != 1:
            raise ValueError(f"{kind}.timesteps must have shape (B, {total}) or (B, 1), got {tuple(m.timesteps.shape)}")
        adaln = getattr(self, f"{p}adaln_single")
        mod, embedded = TokenModulation.build(ts * mult, lambda t: adaln(t, dtype))

        prompt_mod = None
        if cfg.cross_attention_adaln:
            prompt_mod = getattr(self, f"{p}prompt_adaln_single")(m.sigma.flatten() * mult, dtype)[0].view(b, -1, 2 * inner)

        context, context_index = m.context, None
        if contexts is not None:  # one row per distinct context; context_index maps the batch onto them
            keep = device_constant(tuple(contexts[0]), context.device, torch.int64)
            context = context.index_select(0, keep)
            prompt_mod = None if prompt_mod is None else prompt_mod.index_select(0, keep)
            context_index = device_constant(tuple(contexts[1]), context.device, torch.int64)
        if cfg.caption_projection:
            context = getattr(self, f"{p}caption_projection")(context)
        context = context.view(context.shape[0], -1, inner)

        positions = m.positions[:, :, s0:e0]
        spec = RopeSpec(inner, heads, tuple(max_pos), cfg.rope_type, cfg.positional_embedding_theta,
                        cfg.use_middle_indices_grid, cfg.double_precision_rope, self.ctx.tp_size, self.ctx.tp_rank)
        st = StreamState(
            x=x, mod=mod, embedded=embedded, rope=StreamRope(positions, spec, dtype, plan.cache_rope, plan.attn_chunk_tokens),
            context=context, context_index=context_index, context_mask=_context_bias(m.context_mask, dtype),
            layout=layout,
            enabled=m.enabled, prompt_mod=prompt_mod, self_mask=_self_attention_bias(m.attention_mask, dtype),
            offload=video,
        )
        if video and plan.attention_window_frames is not None:  # the opt-in approximation
            st.window = temporal_window(m.positions, m.timesteps, plan.attention_window_frames)
        if cross is not None and cfg.has_video and cfg.has_audio:
            cross_spec = RopeSpec(cfg.audio_cross_attention_dim, heads, (cfg.cross_pe_max_pos,), cfg.rope_type,
                                  cfg.positional_embedding_theta, True, cfg.double_precision_rope,
                                  self.ctx.tp_size, self.ctx.tp_rank)
            st.cross_rope = StreamRope(positions[:, 0:1], cross_spec, dtype, plan.cache_rope, plan.attn_chunk_tokens)
            t = cross.sigma.view(b, 1) * mult
            ss_adaln = getattr(self, f"av_ca_{kind}_scale_shift_adaln_single")
            gate_adaln = self.av_ca_a2v_gate_adaln_single if video else self.av_ca_v2a_gate_adaln_single
            st.cross_ss = ss_adaln(t.flatten(), dtype)[0].view(b, -1, 4 * inner)
            st.cross_gate = gate_adaln(t.flatten() * (cfg.av_ca_timestep_scale_multiplier / mult), dtype)[0].view(b, -1, inner)
        return st

    def _patchify(self, proj: nn.Linear, latent: torch.Tensor, offload: bool, plan: ExecutionPlan):
        """The residual stream's start: latent tokens projected to the inner dim; with the plan's
        residual_offload, chunk by chunk into pinned host memory."""
        if not offload:
            return proj(latent)
        b, n, _ = latent.shape
        x = HostTokens((b, n, proj.out_features), latent.dtype, latent.device)
        for s, e in token_chunks(n, plan.ffn_chunk_tokens):
            x.write(s, e, proj(latent[:, s:e]))
        return x

    def _output(self, kind: str, st: StreamState, plan: ExecutionPlan) -> torch.Tensor:
        p = self._names(kind)
        table = getattr(self, f"{p}scale_shift_table")
        proj = getattr(self, f"{p}proj_out")
        x = st.x
        out = torch.empty(*x.shape[:2], proj.out_features, dtype=x.dtype, device=x.device)
        chunks = token_chunks(x.shape[1], plan.ffn_chunk_tokens)
        walk = rows(x, chunks)
        for s, e in chunks:
            emb = st.embedded.rows(s, e)
            shift, scale = (table[None, None].to(device=x.device, dtype=x.dtype) + emb[:, :, None]).unbind(dim=2)
            h = F.layer_norm(walk.load(s, e), (x.shape[-1],), eps=self.cfg.norm_eps)
            out[:, s:e] = proj(h * (1 + scale) + shift)
        if st.layout.split:
            out = gather_sequence(out, list(st.layout.sizes), self.ctx.sp_group)
        return out


def _step_tokens(video: Modality | None, audio: Modality | None) -> tuple:
    """execution_plan's arguments for these inputs: video, audio and text tokens, batch, whether
    timesteps are per token, dtype bytes."""
    ref = video if video is not None else audio
    b = ref.latent.shape[0]
    return (video.latent.shape[1] if video is not None else 0, audio.latent.shape[1] if audio is not None else 0,
            ref.context.shape[1], b, ref.timesteps.numel() > b, ref.latent.dtype.itemsize)


def _context_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) keep-mask -> additive (B, 1, 1, S) bias, as ltx-core; an all-ones mask adds nothing."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if bool(mask.all()):
        return None
    return (mask - 1).to(dtype).reshape(mask.shape[0], 1, -1, mask.shape[-1]) * torch.finfo(dtype).max


def _self_attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T, T) in [0, 1] -> additive log-space bias (B, 1, T, T), as ltx-core."""
    if mask is None:
        return None
    finfo = torch.finfo(dtype)
    bias = torch.full_like(mask, finfo.min, dtype=dtype)
    positive = mask > 0
    if positive.any():
        bias[positive] = torch.log(mask[positive].clamp(min=finfo.tiny)).to(dtype)
    return bias.unsqueeze(1)
