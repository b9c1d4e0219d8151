"""The memory this process may use on a device (static: every rank reads the same)."""

from __future__ import annotations

import torch


def device_bytes(device) -> int:
    """The memory this process may use on `device`: CUDA total x its per-process fraction; host RAM
    on the CPU. Static (not the free memory of the moment), so every rank reads the same."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        total = torch.cuda.get_device_properties(index).total_memory
        return int(total * torch.cuda.get_per_process_memory_fraction(index))  # torch >= 2.6
    return meminfo("MemTotal")


def meminfo(key: str) -> int:
    """Host memory in bytes from /proc/meminfo (MemTotal, MemAvailable); unbounded where there is none."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info[key].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62
