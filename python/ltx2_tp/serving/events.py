"""One structured (JSON) log line per job state change, on the logger `ltx2_tp.serving.jobs`:

    {"ts": 1764000000.123, "event": "job", "id": "video_...", "status": "completed", "seconds": 41.2}

status: queued | in_progress | completed | failed | cancelled | deleted | expired | requeued | swept |
stopped (running when the server stopped; failed with server_restarted on the next start).
Other events on the same logger: "warmup" (serve --warmup: one line per shape, with its seconds and
the compile cache's hits and misses so far).
"""

from __future__ import annotations

import json
import logging
import time

LOG = logging.getLogger("ltx2_tp.serving.jobs")


def log_job(job_id: str, status: str, **fields) -> None:
    LOG.info(json.dumps({"ts": round(time.time(), 3), "event": "job", "id": job_id, "status": status, **fields}))


def log_event(event: str, **fields) -> None:
    LOG.info(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}))


def log_to_stderr() -> None:
    """The server's command line: job lines to stderr, as they are (one JSON object per line)."""
    if not LOG.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(h)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
