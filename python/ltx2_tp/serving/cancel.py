"""Cancelling a running job: a token the worker sets, checked by the pipeline's progress callback
after every denoising step (and at each stage's start and at the end)."""

from __future__ import annotations

import threading


class JobCancelled(Exception):
    """The job was deleted while it ran; raised at the next step, on every rank at the same step."""


class CancelToken:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise JobCancelled()
