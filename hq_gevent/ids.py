"""Snowflake ids in go-katsubushi's layout: (ms since 2019-01-01Z << 22) | (server_id << 12) | sequence."""
import time
from datetime import datetime, timezone

EPOCH_MS = 1546300800000  # 2019-01-01T00:00:00Z
SERVER_ID_BITS = 10
SEQUENCE_BITS = 12
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_SERVER_ID = (1 << SERVER_ID_BITS) - 1


def now_ms():
    return int(time.time() * 1000)


class IdGenerator:
    def __init__(self, server_id=0, clock=now_ms):
        if not 0 <= server_id <= MAX_SERVER_ID:
            raise ValueError(f"server_id must be 0..{MAX_SERVER_ID}")
        self.server_id = server_id
        self.clock = clock
        self.last_ms = 0
        self.sequence = 0

    def observe(self, job_id):
        """Never issue an id at or below one already stored (the clock may have stepped back)."""
        ms = timestamp_ms(job_id)
        if ms > self.last_ms:
            self.last_ms, self.sequence = ms, MAX_SEQUENCE

    def next_id(self):
        ms = self.clock()
        if ms <= self.last_ms:
            # Same millisecond, or the clock went backwards: keep the last timestamp.
            ms = self.last_ms
            if self.sequence >= MAX_SEQUENCE:
                ms = self._next_millisecond()
                self.sequence = 0
            else:
                self.sequence += 1
        else:
            self.sequence = 0
        self.last_ms = ms
        return ((ms - EPOCH_MS) << (SERVER_ID_BITS + SEQUENCE_BITS)) | (self.server_id << SEQUENCE_BITS) | self.sequence


    def _next_millisecond(self):
        # The sequence ran out: wait for the clock to tick (well under a millisecond).
        # If the clock is behind the last timestamp (stepped back), take last + 1 instead.
        ms = self.clock()
        while ms == self.last_ms:
            ms = self.clock()
        return ms if ms > self.last_ms else self.last_ms + 1


def timestamp_ms(job_id):
    return (job_id >> (SERVER_ID_BITS + SEQUENCE_BITS)) + EPOCH_MS


def format_ms(ms):
    """ISO-8601 UTC with milliseconds and Z, e.g. 2019-10-29T07:32:26.054Z."""
    if ms is None:
        return None
    seconds = ms // 1000
    if seconds != _second_cache[0]:
        prefix = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_cache[:] = [seconds, prefix]
    return "%s%03dZ" % (_second_cache[1], ms % 1000)


_second_cache = [None, ""]  # rendering many jobs of the same second reuses its prefix
