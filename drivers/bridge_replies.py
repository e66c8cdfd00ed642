"""The bridge server's memory of calls, for at-most-once execution of non-idempotent calls.

A call the server accepts becomes a `Job` (by job id) until its reply is sent. Non-idempotent calls
(move_stage, acquire, acquire_diffraction, load_grid) are also remembered by request id: while one runs, a resend of
the same id attaches to it; after it ran, a resend gets the stored reply again. Stored replies are bounded
by count and by bytes; the ids of the last `seen_limit` such calls are kept after their replies are
discarded, so that a very late resend is refused rather than run again. Used by the server's I/O thread
only (not thread-safe).
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: How many request ids of non-idempotent calls the server remembers (ids only, after replies are evicted).
SEEN_IDS = 100_000


@dataclass
class Job:
    """One call being executed for one or more identical requests (same request id)."""

    job_id: int
    request_id: uuid.UUID
    destinations: list[bytes]
    cacheable: bool


class ReplyMemory:
    """Pending jobs, non-idempotent calls in flight, their stored replies and the ids seen (see module doc).

    `cache_size` and `cache_bytes` bound the stored replies (count, total bytes of their frames).
    """

    def __init__(self, cache_size: int, cache_bytes: int, seen_limit: int = SEEN_IDS) -> None:
        self.jobs: dict[int, Job] = {}
        self._job_ids = itertools.count(1)
        self._cache_size = int(cache_size)
        self._cache_bytes = int(cache_bytes)
        self._seen_limit = int(seen_limit)
        self._inflight: dict[uuid.UUID, Job] = {}
        self._replies: OrderedDict[uuid.UUID, tuple[list[Any], int]] = OrderedDict()
        self._replies_total = 0
        self._seen_ids: OrderedDict[uuid.UUID, None] = OrderedDict()

    def stored_reply(self, request_id: uuid.UUID) -> list[Any] | None:
        """The stored reply frames (after the identity) of a call that ran, or None."""
        stored = self._replies.get(request_id)
        return None if stored is None else stored[0]

    def running(self, request_id: uuid.UUID) -> Job | None:
        """The job of a non-idempotent call with this request id that is still running, or None."""
        return self._inflight.get(request_id)

    def was_seen(self, request_id: uuid.UUID) -> bool:
        """True if a non-idempotent call with this request id was accepted before."""
        return request_id in self._seen_ids

    def start(self, request_id: uuid.UUID, identity: bytes, cacheable: bool) -> Job:
        """A new job for the request from `identity`; a `cacheable` one is remembered by request id."""
        job = Job(next(self._job_ids), request_id, [identity], cacheable)
        self.jobs[job.job_id] = job
        if cacheable:
            self._inflight[request_id] = job
            self._seen_ids[request_id] = None
            while len(self._seen_ids) > self._seen_limit:
                self._seen_ids.popitem(last=False)
        return job

    def finish(self, job_id: int) -> Job | None:
        """The job `job_id`, no longer pending (None if unknown)."""
        return self.jobs.pop(job_id, None)

    def remember(self, job: Job, reply: list[Any]) -> None:
        """Store the reply frames of a finished cacheable job, evicting the oldest beyond the bounds."""
        if not job.cacheable:
            return
        self._inflight.pop(job.request_id, None)
        size = sum(len(p) for p in reply)
        self._replies[job.request_id] = (reply, size)
        self._replies_total += size
        while self._replies and (len(self._replies) > self._cache_size or self._replies_total > self._cache_bytes):
            _, (_, old_size) = self._replies.popitem(last=False)
            self._replies_total -= old_size
