"""The keydir (Bitcask's): every stored job as one row of compact columns, ids ascending.

A row holds what listing, filtering, expiry and compaction need: the id, name and url (as
indexes into interned tables), comment, status flags, finish time, and where the job's latest
record lies in the log (offset, length). Payload, headers, output and err stay in the log.
At a million jobs the columns cost ~100 B per job plus the comment's text; a Python object
per job would cost twice that before holding any field.
"""
from array import array
from bisect import bisect_left
from itertools import compress

from hq_gevent.job import CANCELED, FAILURE, SUCCESS

ACTIVE = 8  # waiting or running: the store holds the whole Job in memory, the row only indexes it
FINISH_TIME = 16  # finished_at is set (status "unknown" rather than "unfinished")
STATUS_OF_FLAGS = {}  # flags byte -> status of a row that is not active


def _status(flags):
    if flags & FAILURE:
        return "failure"
    if flags & SUCCESS:
        return "success"
    if flags & CANCELED:
        return "canceled"
    return "unknown" if flags & FINISH_TIME else "unfinished"


for _flags in range(256):
    STATUS_OF_FLAGS[_flags] = None if _flags & ACTIVE else _status(_flags)


def row_flags(job):
    if type(job) is _Fields:
        return job.flags
    return ((SUCCESS if job.success else 0) | (FAILURE if job.failure else 0) | (CANCELED if job.canceled else 0)
            | (ACTIVE if job.waiting or job.running else 0) | (FINISH_TIME if job.finished_at is not None else 0))


def status_table(status):
    """A bytes.translate table: 1 for a flags byte whose row may have `status` (active rows: the
    Job decides), else 0."""
    return bytes(1 if flags & ACTIVE or STATUS_OF_FLAGS[flags] == status else 0 for flags in range(256))


class _Fields:
    """What put() reads of a job, for a row made from record fields."""
    __slots__ = ("id", "finished_at", "flags", "name", "url", "comment")

    def __init__(self, job_id, finished_at, flags, name, url, comment):
        self.id, self.finished_at, self.flags, self.name, self.url, self.comment = \
            job_id, finished_at, flags, name, url, comment


class Strings:
    """An interned table: each distinct text once, rows refer to it by index."""
    __slots__ = ("texts", "index")

    def __init__(self, texts=()):
        self.texts = list(texts)
        self.index = {text: i for i, text in enumerate(self.texts)}

    def add(self, text):
        i = self.index.get(text)
        if i is None:
            i = self.index[text] = len(self.texts)
            self.texts.append(text)
        return i


class Keydir:
    # Column name -> array typecode; `comments` is a list (most are "" or short).
    COLUMNS = (("ids", "q"), ("offsets", "q"), ("lengths", "i"), ("finished", "q"), ("names", "I"), ("urls", "I"))

    def __init__(self):
        self.ids = array("q")
        self.offsets = array("q")
        self.lengths = array("i")
        self.finished = array("q")  # ms, -1 for none
        self.names = array("I")
        self.urls = array("I")
        self.flags = bytearray()
        self.comments = []
        self.name_table = Strings()
        self.url_table = Strings()
        # During a compaction: each row's offset in the new log (-1 until written), kept aligned.
        self.shadow = None

    def __len__(self):
        return len(self.ids)

    def _columns(self):
        cols = [self.ids, self.offsets, self.lengths, self.finished, self.names, self.urls, self.flags, self.comments]
        if self.shadow is not None:
            cols.append(self.shadow)
        return cols

    def find(self, job_id):
        """The row of `job_id`, or None."""
        ids = self.ids
        pos = bisect_left(ids, job_id)
        return pos if pos < len(ids) and ids[pos] == job_id else None

    def put(self, job, offset, length):
        """Index `job` (its state as its record at `offset` has it); returns the length of the
        record it replaces, 0 for a new job."""
        ids = self.ids
        pos = len(ids)
        if pos and job.id <= ids[-1]:
            pos = bisect_left(ids, job.id)
            if ids[pos] == job.id:
                old = self.lengths[pos]
                self.offsets[pos] = offset
                self.lengths[pos] = length
                self.finished[pos] = -1 if job.finished_at is None else job.finished_at
                self.flags[pos] = row_flags(job)
                self.comments[pos] = job.comment
                self.names[pos] = self.name_table.add(job.name)
                self.urls[pos] = self.url_table.add(job.url)
                return old
        finished = -1 if job.finished_at is None else job.finished_at
        if pos == len(ids):  # the usual case: ids grow (one push, one row)
            ids.append(job.id)
            self.offsets.append(offset)
            self.lengths.append(length)
            self.finished.append(finished)
            self.names.append(self.name_table.add(job.name))
            self.urls.append(self.url_table.add(job.url))
            self.flags.append(row_flags(job))
            self.comments.append(job.comment)
            if self.shadow is not None:
                self.shadow.append(-1)
        else:
            row = (job.id, offset, length, finished, self.name_table.add(job.name), self.url_table.add(job.url),
                   row_flags(job), job.comment)
            for col, value in zip(self._columns(), row):
                col.insert(pos, value)
            if self.shadow is not None:
                self.shadow.insert(pos, -1)
        return 0

    def put_row(self, job_id, offset, length, finished, flags, name, url, comment):
        """put() from a record's fields (the replay's fast path: no Job built); `flags` as
        row_flags() gives them, `finished` None or ms."""
        ids = self.ids
        pos = len(ids) - 1
        if pos < 0 or job_id != ids[pos]:  # not the last row (the usual case in a replay)
            if pos < 0 or job_id > ids[pos]:
                pos = -1
            else:
                pos = bisect_left(ids, job_id)
                if ids[pos] != job_id:
                    pos = -1
        if pos < 0:
            return self.put(_Fields(job_id, finished, flags, name, url, comment), offset, length)
        old = self.lengths[pos]
        self.offsets[pos] = offset
        self.lengths[pos] = length
        self.finished[pos] = -1 if finished is None else finished
        self.flags[pos] = flags
        self.comments[pos] = comment
        self.names[pos] = self.name_table.add(name)
        self.urls[pos] = self.url_table.add(url)
        return old

    def remove(self, job_ids):
        """Drop the rows of `job_ids`; returns the record bytes they held."""
        positions = [p for p in map(self.find, job_ids) if p is not None]
        freed = sum(self.lengths[p] for p in positions)
        if len(positions) < 32:
            for pos in sorted(positions, reverse=True):
                for col in self._columns():
                    del col[pos]
        elif positions:
            keep = bytearray(b"\x01") * len(self.ids)
            for pos in positions:
                keep[pos] = 0
            for name, code in self.COLUMNS:
                setattr(self, name, array(code, compress(getattr(self, name), keep)))
            self.flags = bytearray(compress(self.flags, keep))
            self.comments = list(compress(self.comments, keep))
            if self.shadow is not None:
                self.shadow = array("q", compress(self.shadow, keep))
        return freed

    def status(self, pos):
        """The status of a row that is not active (None for an active one)."""
        return STATUS_OF_FLAGS[self.flags[pos]]

    def name(self, pos):
        return self.name_table.texts[self.names[pos]]

    def url(self, pos):
        return self.url_table.texts[self.urls[pos]]
