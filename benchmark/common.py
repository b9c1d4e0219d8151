"""Shared by the benchmarks: FLOP count of one step, timing, ltx-core built on the GPU, kernel groups."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ltx2_tp.latent_grid import LatentGrid  # noqa: E402
from ltx2_tp.models.ltx2.config import LTX2Config  # noqa: E402


def case_tokens(w: int, h: int, f: int, fps: float = 24.0) -> tuple[int, int]:
    """(video tokens, audio tokens) of a WxHxF case."""
    grid = LatentGrid(f, h, w)
    return grid.video_tokens, grid.audio_tokens(fps)


def step_flops(cfg: LTX2Config, t: int, ta: int, s: int = 256) -> float:
    """Matmul FLOPs of one AV DiT forward (2 per multiply-add); elementwise work not counted.

    Per block: video qkv+out (4 T D^2), text q+out (2 T D^2), text k/v (2 S D^2), FFN (8 T D^2);
    the same for audio with (Ta, Da); a2v q/out (2 T D Da) + k/v (2 Ta Da^2); v2a q/out (2 Ta Da^2)
    + k/v (2 T D Da); attention 4 N_q N_k d_model for each of the six attentions.
    """
    d, da = cfg.inner_dim, cfg.audio_inner_dim
    lin = (14 * t * d * d + 2 * s * d * d) + (14 * ta * da * da + 2 * s * da * da)
    lin += 2 * t * d * da + 2 * ta * da * da + 2 * ta * da * da + 2 * t * d * da
    attn = 4 * t * t * d + 4 * t * s * d + 4 * ta * ta * da + 4 * ta * s * da + 2 * 4 * t * ta * da
    return cfg.num_layers * (2 * lin + attn)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, warmup: int = 1, repeat: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def median(xs):
    return statistics.median(xs)


def init_like_ours(named_params, seed: int, device) -> None:
    """The same distribution rules as ltx2_tp's init_random, drawn on the GPU."""
    g = torch.Generator(device=torch.device(device)).manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "scale_shift_table" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=device) / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)


def build_ltx_core_gpu(cfg: LTX2Config, device, dtype, seed: int = 0, attention: str = "default"):
    """ltx-core's LTXModel with the full config, meta-built then materialised on the GPU."""
    ref = ltx_core_on_meta(cfg, attention).to(dtype).to_empty(device=device).eval()
    init_like_ours(ref.named_parameters(), seed, device)
    return ref


def ltx_core_on_meta(cfg: LTX2Config, attention: str = "default"):
    """ltx-core's LTXModel (audio-video) at `cfg`, on the meta device: no memory until materialised
    or given tensors (load_state_dict(..., assign=True))."""
    from ltx_core.model.transformer.attention import AttentionFunction
    from ltx_core.model.transformer.model import LTXModel, LTXModelType
    from ltx_core.model.transformer.rope import LTXRopeType
    from ltx_core.model.transformer.text_projection import PixArtAlphaTextProjection

    with torch.device("meta"):
        ref = LTXModel(
            model_type=LTXModelType.AudioVideo, num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            num_layers=cfg.num_layers, cross_attention_dim=cfg.cross_attention_dim, norm_eps=cfg.norm_eps,
            attention_type=AttentionFunction(attention),
            positional_embedding_theta=cfg.positional_embedding_theta,
            positional_embedding_max_pos=list(cfg.positional_embedding_max_pos),
            timestep_scale_multiplier=cfg.timestep_scale_multiplier, use_middle_indices_grid=cfg.use_middle_indices_grid,
            audio_num_attention_heads=cfg.audio_num_attention_heads, audio_attention_head_dim=cfg.audio_attention_head_dim,
            audio_in_channels=cfg.audio_in_channels, audio_out_channels=cfg.audio_out_channels,
            audio_cross_attention_dim=cfg.audio_cross_attention_dim,
            audio_positional_embedding_max_pos=list(cfg.audio_positional_embedding_max_pos),
            av_ca_timestep_scale_multiplier=cfg.av_ca_timestep_scale_multiplier, rope_type=LTXRopeType(cfg.rope_type),
            double_precision_rope=cfg.double_precision_rope, apply_gated_attention=cfg.apply_gated_attention,
            caption_projection=PixArtAlphaTextProjection(cfg.caption_channels, cfg.inner_dim) if cfg.caption_projection else None,
            audio_caption_projection=(PixArtAlphaTextProjection(cfg.caption_channels, cfg.audio_inner_dim)
                                      if cfg.caption_projection else None),
            cross_attention_adaln=cfg.cross_attention_adaln,
        )
    return ref


def run_ltx_core(ref, video, audio):
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig
    from ltx_core.model.transformer.modality import Modality as LM

    def conv(m):
        return None if m is None else LM(latent=m.latent, sigma=m.sigma, timesteps=m.timesteps,
                                          positions=m.positions, context=m.context, enabled=m.enabled,
                                          context_mask=m.context_mask)

    with torch.inference_mode():
        return ref(conv(video), conv(audio), BatchedPerturbationConfig.empty(video.latent.shape[0]))


# ---- kernel summaries (torch.profiler / CUPTI) ------------------------------------------------
GROUPS = [
    ("communication", ("nccl", "allreduce", "all_reduce", "allgather", "alltoall", "sendrecv")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "wgmma", "s16816", "sm90")),
]


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "elementwise/other"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _intersection(a, b) -> float:
    """Total length of the overlap of two unions of disjoint sorted intervals."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def kernel_summary(prof) -> dict:
    """Kernel time per group, plus exposed communication: the time a collective kernel runs while
    no compute kernel does (overlapped collectives still count in the group's kernel time)."""
    per_kernel = defaultdict(float)
    comm, compute = [], []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.device_time_total  # us
            iv = (evt.time_range.start, evt.time_range.end)
            (comm if kernel_group(evt.name) == "communication" else compute).append(iv)
    groups = defaultdict(float)
    for k, v in per_kernel.items():
        groups[kernel_group(k)] += v
    total = sum(groups.values()) or 1.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    comm, compute = _union(comm), _union(compute)
    busy = _length(_union(comm + compute)) or 1.0
    exposed = _length(comm) - _intersection(comm, compute)
    return {"total_ms": total / 1e3, "groups": {g: (v / 1e3, v / total) for g, v in groups.items()},
            "top": [(k[:110], v / 1e3, v / total, kernel_group(k)) for k, v in top],
            "busy_ms": busy / 1e3, "exposed_comm_ms": exposed / 1e3, "exposed_comm_share": exposed / busy}


def summary_markdown(title: str, header: str, s: dict) -> str:
    lines = [f"# {title}", "", header, "", f"Total kernel time: {s['total_ms']:.1f} ms", "",
             "| group | ms | share |", "|---|---|---|"]
    for g, (ms, share) in sorted(s["groups"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {g} | {ms:.1f} | {share:.1%} |")
    if "exposed_comm_ms" in s:
        lines += ["", f"GPU busy (any kernel running): {s['busy_ms']:.1f} ms; communication with no compute "
                  f"kernel beside it (exposed): {s['exposed_comm_ms']:.1f} ms = {s['exposed_comm_share']:.1%} of busy time"]
    lines += ["", "| kernel | group | ms | share |", "|---|---|---|---|"]
    for name, ms, share, g in s["top"]:
        lines.append(f"| `{name}` | {g} | {ms:.1f} | {share:.1%} |")
    return "\n".join(lines) + "\n"


def write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))
