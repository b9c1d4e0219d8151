"""A job's files on disk, and the sweep that removes what no job owns.

    output_dir/<id>/input_reference.png   the uploads (serving/uploads.py: also video_reference.*,
                                          audio_path.*, video_conditioning_<i>.*), while the job is
                                          queued or running; the request keeps their paths
    output_dir/<id>/video.<fmt>           once completed, with thumbnail.png
    output_dir/.tmp/<id>/                 where the worker writes; moved into <id>/ only if the
                                          job still exists when it finishes

So a deleted (cancelled) job's late writes land in .tmp and are removed, never in a directory
that was just deleted; and after a crash the sweep removes .tmp and every `video_*` directory no
live job owns. Other files in the output directory are never touched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.serving.job import ID_RE, Job

THUMBNAIL = "thumbnail.png"
STAGING = ".tmp"


class JobFiles:
    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not ID_RE.match(job_id):
            raise KeyError(job_id)
        d = (self.root / job_id).resolve()
        if d.parent != self.root:  # belt and braces: never outside output_dir
            raise KeyError(job_id)
        return d

    def staging_dir(self, job_id: str) -> Path:
        return self.root / STAGING / self.job_dir(job_id).name

    @staticmethod
    def input_names(req: GenerationRequest) -> set[str]:
        """The names of the uploads a job's request reads (each in the job's directory)."""
        paths = [req.image_path, req.video_path, req.audio_path, *(p for p, _ in req.video_conditioning)]
        return {Path(p).name for p in paths if p}

    def localize(self, job: Job) -> None:
        """Point the request's upload paths into the job's directory as it is now (one place says
        where the uploads are, wherever the output directory lives after a restart)."""
        req, d = job.request, self.job_dir(job.id)
        for f in ("image_path", "video_path", "audio_path"):
            if getattr(req, f):
                setattr(req, f, str(d / Path(getattr(req, f)).name))
        req.video_conditioning = [(str(d / Path(p).name), s) for p, s in req.video_conditioning]

    @staticmethod
    def video_name(job: Job) -> str:
        return f"video.{job.request.output_format}"

    def video(self, job: Job) -> Path:
        return self.job_dir(job.id) / self.video_name(job)

    def thumbnail(self, job: Job) -> Path:
        return self.job_dir(job.id) / THUMBNAIL

    def publish(self, job_id: str, names: list[str]) -> None:
        """Move the finished files from the staging directory into the job's (each move atomic)."""
        src, dst = self.staging_dir(job_id), self.job_dir(job_id)
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            os.replace(src / n, dst / n)
        shutil.rmtree(src, ignore_errors=True)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.staging_dir(job_id), ignore_errors=True)

    def remove_inputs(self, job: Job) -> None:
        """A finished job's uploads (its video and thumbnail stay)."""
        for name in self.input_names(job.request):
            (self.job_dir(job.id) / name).unlink(missing_ok=True)
        try:  # a job with uploads that failed leaves no empty directory behind
            self.job_dir(job.id).rmdir()
        except OSError:
            pass

    def sweep(self, owned: dict[str, set[str]]) -> list[Path]:
        """Remove the staging area, every job directory not in `owned` (id -> the file names it may
        hold) and, inside owned ones, any other file. Returns what was removed."""
        removed = []
        staging = self.root / STAGING
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
        for p in sorted(self.root.iterdir()):
            if not ID_RE.match(p.name):
                continue
            keep = owned.get(p.name)
            if keep is None or not p.is_dir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
                continue
            for f in sorted(p.iterdir()):
                if f.name not in keep:
                    shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
                    removed.append(f)
        return removed
