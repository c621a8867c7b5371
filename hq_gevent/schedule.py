"""Jobs that may not start before a given time (runAt, retry backoff): a timer heap and its parsing at push.

A scheduled job takes no slot of the dispatch queue: it waits here, as one int in a heap,
until it is due, then the store enqueues it. Nothing polls the stored jobs.
"""
import heapq
from datetime import datetime

import gevent
import gevent.event

from hq_gevent.ids import now_ms
from hq_gevent.invalid import Invalid

MAX_DELAY = 31536000  # a year, in seconds
_ID_BITS = 64


def run_at_from_request(body, now):
    """The pushed `delay` or `runAt` as a time in ms, or None to start now (SPEC §10.2)."""
    delay, run_at = body.get("delay"), body.get("runAt")
    if delay is not None and run_at is not None:
        raise Invalid(422, "give either 'delay' or 'runAt', not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise Invalid(400, "'delay' must be a number of seconds")
        if not 0 <= delay <= MAX_DELAY:
            raise Invalid(422, f"'delay' must be from 0 to {MAX_DELAY} seconds")
        return now + int(delay * 1000) if delay > 0 else None
    if run_at is None:
        return None
    if not isinstance(run_at, str):
        raise Invalid(400, "'runAt' must be a string")
    try:
        when = datetime.fromisoformat(run_at)
    except ValueError:
        raise Invalid(422, f"'runAt' is not an RFC 3339 time: {run_at!r}") from None
    if when.tzinfo is None or "T" not in run_at.upper():
        raise Invalid(422, f"'runAt' needs a date, a time and an offset (e.g. 2026-12-24T18:00:00Z): {run_at!r}")
    ms = int(when.timestamp() * 1000)
    if ms > now + MAX_DELAY * 1000:
        raise Invalid(422, "'runAt' is more than a year ahead")
    return ms if ms > now else None


class Schedule:
    """A heap of (run_at << 64 | job id) ints; `release(job_id, run_at)` is called for each one due.

    Entries are never removed early: a job stopped or restarted meanwhile is recognised as
    stale by the store when its entry comes due (lazy deletion keeps add O(log n)).
    """

    def __init__(self, release):
        self.release = release
        self.heap = []
        self._wakeup = gevent.event.Event()
        self._greenlet = None

    def add(self, job_id, run_at):
        entry = (run_at << _ID_BITS) | job_id
        if not self.heap or entry < self.heap[0]:
            self._wakeup.set()  # the sleeper waits for a later head
        heapq.heappush(self.heap, entry)

    def start(self):
        self._greenlet = gevent.spawn(self._run)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self):
        heap, mask = self.heap, (1 << _ID_BITS) - 1
        while True:
            self._wakeup.clear()
            if not heap:
                self._wakeup.wait()
                continue
            delay = ((heap[0] >> _ID_BITS) - now_ms()) / 1000
            if delay > 0:
                self._wakeup.wait(min(delay, 1.0))  # at most a second: a clock step cannot strand it
                continue
            now = now_ms()
            released = 0
            while heap and heap[0] >> _ID_BITS <= now:
                entry = heapq.heappop(heap)
                self.release(entry & mask, entry >> _ID_BITS)
                released += 1
                if released % 1000 == 0:
                    gevent.sleep(0)  # a million due at once must not stall serving
