"""/metrics in Prometheus' text format (prometheus-client), one registry per server.

    ltx2_queue_depth                      jobs waiting
    ltx2_jobs{status}                     jobs the store holds, by status
    ltx2_jobs_finished_total{outcome}     completed | failed | cancelled | stopped, since start
    ltx2_stage_seconds{stage}             wall time per pipeline stage (text_encoding ... decode_and_write)
    ltx2_step_seconds{stage}              wall time per denoising step (stage1 / stage2)
    ltx2_gpu_memory_bytes{rank,kind}      allocated / reserved on each rank's GPU (0 on CPU), as of the
                                          last step (ranks > 0 report it through the step agreement)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ltx2_tp.serving.job import STATUSES
from ltx2_tp.serving.store import JobStore

# a real step takes 0.1-200 s, a tiny CPU one a few ms; a stage up to an hour
STEP_BUCKETS = (0.005, 0.02, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 200, 400)
STAGE_BUCKETS = (0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


def device_memory(device) -> tuple[int, int]:
    """(allocated, reserved) bytes on this process's GPU; (0, 0) on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


class ServerMetrics:
    def __init__(self, store: JobStore, rank_memory: Callable[[], list[tuple[int, int]]]):
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram("ltx2_stage_seconds", "Wall time per pipeline stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("ltx2_step_seconds", "Wall time per denoising step", ["stage"],
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.jobs_finished = Counter("ltx2_jobs_finished", "Jobs that left the worker, by outcome", ["outcome"],
                                     registry=self.registry)
        self.registry.register(_StoreCollector(store, rank_memory))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StoreCollector:
    """Read at scrape time from the store, so the figures hold across restarts."""

    def __init__(self, store: JobStore, rank_memory):
        self.store, self.rank_memory = store, rank_memory

    def collect(self):
        counts = self.store.count_by_status()
        yield GaugeMetricFamily("ltx2_queue_depth", "Jobs waiting in the queue", value=counts.get("queued", 0))
        jobs = GaugeMetricFamily("ltx2_jobs", "Jobs in the store by status", labels=["status"])
        for s in STATUSES:
            jobs.add_metric([s], counts.get(s, 0))
        yield jobs
        mem = GaugeMetricFamily("ltx2_gpu_memory_bytes", "GPU memory per rank (0 on CPU)", labels=["rank", "kind"])
        for rank, (allocated, reserved) in enumerate(self.rank_memory()):
            mem.add_metric([str(rank), "allocated"], allocated)
            mem.add_metric([str(rank), "reserved"], reserved)
        yield mem
