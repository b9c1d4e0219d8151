"""Helpers the server tests share."""

from __future__ import annotations

import time


def wait_done(manager, job_id: str, timeout: float = 120):
    """Poll a JobManager until the job is completed or failed; returns the job."""
    t = time.time()
    while (j := manager.get(job_id)).status not in ("completed", "failed"):
        assert time.time() - t < timeout, j
        time.sleep(0.02)
    return j
