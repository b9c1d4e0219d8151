"""The embedded job store: one SQLite file in the output directory (stdlib sqlite3).

WAL journal with synchronous=NORMAL: a committed state change survives the process being killed
(kill -9); only a power cut can lose the last few. Every state change is one transaction, so the
file never holds a half-made change. One connection, shared by the HTTP thread and the worker
under a lock: each statement takes well under a millisecond.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, fields
from pathlib import Path

from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.serving.job import Job

FILENAME = "jobs.sqlite3"
_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)}  # a row written by another version keeps loading

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    request TEXT NOT NULL,
    model TEXT NOT NULL,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    completed_at INTEGER,
    expires_at INTEGER,
    error TEXT,
    pipeline TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
# Columns added after the first schema, with their type: a database written before them gets them on
# open (ALTER TABLE ... ADD COLUMN: existing rows read NULL). pipeline NULL: the server's default.
_ADDED = {"pipeline": "TEXT"}
_COLUMNS = ("seq, id, request, model, seconds, size, created_at, status, progress, started_at, completed_at, expires_at, "
            "error, pipeline")


def _job(row) -> Job:
    (seq, id_, request, model, seconds, size, created_at, status, progress, started_at, completed_at, expires_at, error,
     pipeline) = row
    req = GenerationRequest(**{k: v for k, v in json.loads(request).items() if k in _REQUEST_FIELDS})
    req.pipeline = pipeline
    return Job(id=id_, request=req, model=model, seconds=seconds, size=size,
               created_at=created_at, status=status, progress=progress, started_at=started_at,
               completed_at=completed_at, expires_at=expires_at, error=json.loads(error) if error else None, seq=seq)


class SQLiteJobStore:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / FILENAME
        self._lock = threading.Lock()
        # autocommit mode: each `with self._tx()` block is one explicit transaction
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._tx() as db:
            have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def add(self, job: Job, max_queued: int) -> bool:
        with self._tx() as db:
            (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= max_queued:
                return False
            cur = db.execute(
                "INSERT INTO jobs (id, request, model, seconds, size, created_at, status, progress, pipeline) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, json.dumps(asdict(job.request)), job.model, job.seconds, job.size, job.created_at,
                 job.status, job.progress, job.request.pipeline))
            job.seq = cur.lastrowid
            return True

    def get(self, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self) -> list[Job]:
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        return [_job(r) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self._tx() as db:
            return dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def claim_next(self, started_at: float) -> Job | None:
        with self._tx() as db:
            row = db.execute(
                f"UPDATE jobs SET status = 'in_progress', progress = 0, started_at = ? WHERE seq = "
                f"(SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) RETURNING {_COLUMNS}",
                (started_at,)).fetchone()
        return _job(row) if row else None

    def set_progress(self, job_id: str, progress: int) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id)).rowcount > 0

    def finish(self, job_id: str, status: str, completed_at: int, expires_at: int, error: dict | None = None) -> bool:
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET status = ?, progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END, "
                "completed_at = ?, expires_at = ?, error = ? WHERE id = ?",
                (status, status, completed_at, expires_at, json.dumps(error) if error else None, job_id)).rowcount > 0

    def delete(self, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute(f"DELETE FROM jobs WHERE id = ? RETURNING {_COLUMNS}", (job_id,)).fetchone()
        return _job(row) if row else None

    def expired(self, now: float) -> list[str]:
        with self._tx() as db:
            return [r[0] for r in db.execute("SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? "
                                             "ORDER BY seq", (now,))]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE (takes the write lock up front: a count-then-insert cannot interleave) ... COMMIT."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, *_):
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
