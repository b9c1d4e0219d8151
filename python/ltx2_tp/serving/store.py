"""Where jobs are kept: the interface the job manager talks to.

The embedded default is SQLite in the output directory (sqlite_store.py). A shared database can
take its place when several server processes serve one queue: `claim_next` must then be atomic
across processes (one job goes to one worker), which SQLite's write lock already gives.
"""

from __future__ import annotations

from typing import Protocol

from ltx2_tp.serving.job import Job


class JobStore(Protocol):
    def add(self, job: Job, max_queued: int) -> bool:
        """Insert a queued job, unless `max_queued` jobs are queued already (then False)."""

    def get(self, job_id: str) -> Job | None: ...

    def list(self) -> list[Job]:
        """Every job, in submission order."""

    def count_by_status(self) -> dict[str, int]: ...

    def claim_next(self, started_at: float) -> Job | None:
        """The oldest queued job, now in_progress: atomically, so no two workers take the same one."""

    def set_progress(self, job_id: str, progress: int) -> bool:
        """False when the job no longer exists (deleted: its worker stops)."""

    def finish(self, job_id: str, status: str, completed_at: int, expires_at: int, error: dict | None = None) -> bool:
        """completed or failed; False when the job no longer exists."""

    def delete(self, job_id: str) -> Job | None:
        """Remove the job; the removed job, or None if there was none."""

    def expired(self, now: float) -> list[str]:
        """Ids of the jobs whose expires_at has passed."""

    def close(self) -> None: ...
