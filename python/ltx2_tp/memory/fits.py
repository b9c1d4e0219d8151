"""Does a request run as one piece on this device? `fits_dense` answers LTX2LongVideo's `auto` mode.

A stand-in until the memory planner (memory/planner.py, issue 15) answers it: the resident
weights of every component plus the DiT's activation peak at the request's full size, within a
safety fraction of the device's memory. The activation model is fitted to our chunked DiT's
measured peaks on an H100 (shared/anchors.md, 2026-11-23, 1920x1088, LTX2LongVideo's 2 GiB chunk
plan): 15.0 GiB at 246,840 tokens, 18.7 at 369,240, 31.0 at 736,440, i.e. about 3.5 chunk budgets
(7 GiB) plus 35 KB per video token = 4.3 copies of a token's hidden state (4096 x bf16).

It reads only static sizes (parameters, the device's total memory and per-process fraction), never
the free memory of the moment, so every rank of a job takes the same decision.
"""

from __future__ import annotations

import torch

from ltx2_tp.latent_grid import LatentGrid, tokens_per_rank

SAFETY = 0.9  # of the device's memory (fragmentation, cuDNN workspaces, the VAE decoder's tiles)
HIDDEN_COPIES = 4.3  # activation bytes per video token, in hidden states (inner_dim x dtype bytes)
BUDGET_COPIES = 3.5  # fixed activation bytes, in chunk budgets (memory/plan.py's PlanRule)


def device_bytes(device: torch.device) -> int:
    """The memory this process may use on `device`: CUDA total x its per-process fraction; host RAM on the CPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * torch.cuda.get_per_process_memory_fraction(device))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62


def resident_bytes(components) -> int:
    """Bytes of every parameter and buffer of the components on their device (this rank's shards)."""
    seen, total = set(), 0
    for name in ("transformer", "video_encoder", "video_decoder", "upsampler", "audio_decoder", "vocoder", "text_encoder"):
        module = getattr(components, name, None)
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device.type == components.device.type and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def dense_activation_bytes(components, req) -> int:
    """The DiT's activation peak for `req` in one piece: its full-size stage on the tokens this rank holds."""
    model = components.transformer
    cfg, ctx = model.cfg, model.ctx
    tokens = tokens_per_rank(LatentGrid(req.num_frames, req.height, req.width).video_tokens, ctx.sp_size)
    item = torch.empty((), dtype=components.dtype).element_size()
    hidden = cfg.inner_dim * item
    budget = getattr(getattr(model, "plan_rule", None), "budget_bytes", 2 * 2**30)
    return int(BUDGET_COPIES * budget + HIDDEN_COPIES * hidden * tokens)


def fits_dense(components, req) -> bool:
    """Whether `req` fits this device as one piece (weights + the dense activation peak <= SAFETY x memory)."""
    need = resident_bytes(components) + dense_activation_bytes(components, req)
    return need <= SAFETY * device_bytes(components.device)
