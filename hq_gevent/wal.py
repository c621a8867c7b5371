"""The write-ahead log: one JSON line per mutation, group-committed, with a crash-safe rewrite.

Modelled on Redis' AOF: appends go to one writer greenlet that writes (and, under
"always", fsyncs) everything pending in one batch, then wakes every waiter of that batch.
The fsync runs in gevent's threadpool so the event loop keeps serving meanwhile.
"""
import contextlib
import logging
import os
import time

import gevent
import gevent.event
import gevent.lock
import ujson

from hq_gevent.storage import StoreUnavailable

log = logging.getLogger("hq_gevent")

READ_CHUNK = 8 << 20
WRITEV_MAX = 512  # buffers per writev (IOV_MAX is 1024 on Linux)
TEST_PAUSE_ENV = "HQ_GEVENT_TEST_COMPACT_PAUSE"


class WalError(StoreUnavailable):
    """A log write failed (disk full, I/O error): the change it carried did not happen."""


class WalCorrupt(Exception):
    """The log has a bad record that is not a torn tail: refuse to start."""


class _Batch:
    __slots__ = ("lines", "callbacks", "nbytes", "done", "error")

    def __init__(self):
        self.lines = []
        self.callbacks = []  # (on_durable, where its data starts within the batch)
        self.nbytes = 0
        self.done = gevent.event.Event()
        self.error = None


class WriteAheadLog:
    def __init__(self, path, fsync="always", metrics=None):
        self.path = path
        self.fsync_policy = fsync
        self.metrics = metrics  # a hq_gevent.metrics.Metrics, or None: times batches, counts failures
        self.last_error = None  # why the last batch could not be written; None once one is
        self.size = 0  # bytes of whole records on disk; a failed write is cut back to this
        self.fd = None
        self._batch = _Batch()
        self._wakeup = gevent.event.Event()
        self._switch = gevent.lock.Semaphore()  # held by a batch write, and by a rewrite's switch-over
        self._writer = self._syncer = None
        self._closed = False
        self._torn = False  # a failed write may have left a partial record past `size`
        self._threadpool = None

    # --- loading -------------------------------------------------------------------
    def load(self, apply, start=0):
        """Call apply(record, offset, size_in_bytes) for each record from byte `start` on (a
        record boundary: 0, or the end a hint file covers), in order; cut a torn last line;
        raise WalCorrupt on others."""
        leftover = self.path + ".rewrite"
        if os.path.exists(leftover):
            log.warning("Removing %s left by an interrupted compaction; %s is intact", leftover, self.path)
            os.unlink(leftover)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            good = self._replay(fd, apply, start)
            end = os.fstat(fd).st_size
            if good < end:
                log.warning("%s: dropped a torn last record (%d bytes at offset %d) left by a crash mid-write",
                            self.path, end - good, good)
                os.ftruncate(fd, good)
                os.fsync(fd)
        finally:
            os.close(fd)
        self.size = good

    def _replay(self, fd, apply, start):
        """Returns the offset just past the last whole line."""
        offset = start
        os.lseek(fd, start, os.SEEK_SET)
        lines_done = 0
        tail = b""
        loads = ujson.loads
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                return offset
            data = tail + chunk
            lines = data.split(b"\n")
            tail = lines.pop()  # no newline yet: maybe the rest is in the next chunk, maybe torn
            at = offset
            for index, line in enumerate(lines):
                try:
                    apply(loads(line), at, len(line) + 1)
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    where = f"{lines_done + index + 1}" if not start else f"{lines_done + index + 1} after byte {start}"
                    raise WalCorrupt(f"{self.path}:{where}: bad record ({e}); refusing to start. "
                                     "Move the file aside or repair that line.") from None
                at += len(line) + 1
            lines_done += len(lines)
            offset += len(data) - len(tail)
            gevent.sleep(0.001)  # the server already listens: poll for its requests (/readyz) between chunks

    # --- appending -----------------------------------------------------------------
    def open(self, threadpool):
        self._threadpool = threadpool
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._writer = gevent.spawn(self._write_loop)
        if self.fsync_policy == "everysec":
            self._syncer = gevent.spawn(self._sync_every_second)

    def append(self, line, on_durable=None):
        """Queue one record (bytes ending in newline) and wait until it is written per the fsync policy.

        on_durable(offset) runs in the writer, in log order, before any later batch is written,
        with the file offset where `line` starts:
        the in-memory state therefore always equals a replay of the log up to `size`.
        Raises WalError if the write failed; then on_durable is not called.
        """
        if self._closed:
            raise WalError("the server is shutting down")
        batch = self._batch
        batch.lines.append(line)
        if on_durable is not None:
            batch.callbacks.append((on_durable, batch.nbytes))
        batch.nbytes += len(line)
        self._wakeup.set()
        batch.done.wait()
        if batch.error:
            raise WalError(batch.error)

    def _write_loop(self):
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            batch = self._batch
            if not batch.lines:
                if self._closed:
                    return
                continue
            self._batch = _Batch()
            with self._switch:
                self._commit(batch)

    def _commit(self, batch):
        data = b"".join(batch.lines)
        started = time.perf_counter()
        try:
            if self._torn:
                self._cut_back()
            if self.fsync_policy == "always":
                self._in_thread(self._write_and_sync, data)
            else:
                _write_fd(self.fd, data)
        except OSError as e:
            if self.metrics is not None:
                self.metrics.write_failed()
            batch.error = self.last_error = f"cannot write the job log: {e.strerror or e}"
            log.error("Writing %s failed: %s", self.path, batch.error)
            self._torn = True
            try:
                self._cut_back()
            except OSError as cut_error:
                log.error("Cannot cut %s back to %d bytes: %s", self.path, self.size, cut_error)
        else:
            if self.metrics is not None:
                self.metrics.store_write(time.perf_counter() - started)
            base = self.size
            self.size += len(data)
            self.last_error = None
            for callback, at in batch.callbacks:
                try:
                    callback(base + at)
                except Exception:
                    log.exception("Applying a logged change failed")
        batch.done.set()

    def _in_thread(self, func, *args):
        """Run blocking file I/O in the threadpool. An OSError comes back as a value and is
        raised here: raised in the worker thread, gevent would try to print it — and on a
        full disk that print fails too, losing the result and hanging the caller."""
        def call():
            try:
                func(*args)
            except OSError as e:
                return e

        error = self._threadpool.apply(call)
        if error is not None:
            raise error

    def _write_and_sync(self, data):
        _write_fd(self.fd, data)
        os.fsync(self.fd)

    def _cut_back(self):
        # Remove a partly written record so the log still loads. If even that fails, the
        # next batch tries again first (and fails itself rather than append after garbage).
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        self._torn = False

    def _sync_every_second(self):
        while not self._closed:
            gevent.sleep(1)
            try:
                self._in_thread(os.fsync, self.fd)
            except OSError as e:
                log.error("fsync of %s failed: %s", self.path, e)

    def close(self):
        """Write what is pending, fsync, close. Later appends fail with WalError."""
        if self.fd is None:
            return
        self._closed = True
        self._wakeup.set()
        self._writer.join()
        if self._syncer:
            self._syncer.kill()
        try:
            os.fsync(self.fd)
        except OSError as e:
            log.error("fsync of %s failed: %s", self.path, e)
        os.close(self.fd)
        self.fd = None

    # --- compaction ----------------------------------------------------------------
    def rewrite(self, snapshot, on_switch=None):
        """Replace the log by `snapshot` (an iterable of lists of record lines) plus the records
        appended meanwhile. Never blocks appends except for the final switch-over; a crash at
        any step leaves either the old log or the new one. on_switch(start, written) runs within
        the switch-over: the records that were at offset >= `start` of the old log now start
        at `written` - `start` further (`written`: the snapshot's bytes). Returns (start, written)."""
        tmp = self.path + ".rewrite"
        with self._switch:
            start = self.size  # in-memory state == replay of the log up to here
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        written = 0
        try:
            for lines in snapshot:
                # Joined and written in the threadpool: the loop copies no megabytes.
                self._in_thread(_write_lines, fd, lines)
                written += sum(map(len, lines))
                gevent.sleep(0)
            _test_pause("written")
            self._in_thread(os.fsync, fd)
            _test_pause("fsynced")
            with self._switch:
                self._in_thread(self._copy_tail, fd, start)
                os.rename(tmp, self.path)
                _fsync_dir(os.path.dirname(self.path) or ".")
                os.close(self.fd)
                self.fd, fd = fd, None
                self.size = os.fstat(self.fd).st_size
                if on_switch is not None:
                    on_switch(start, written)
            if self.metrics is not None:
                self.metrics.compacted()
            _test_pause("renamed")
            return start, written
        finally:
            if fd is not None:
                os.close(fd)
                if os.path.exists(tmp):
                    os.unlink(tmp)

    @contextlib.contextmanager
    def paused(self):
        """No batch is written (nor its changes applied) meanwhile: what is in memory stays
        a replay of the log's first `size` bytes. Appends wait; the loop serves on."""
        with self._switch:
            yield self.size

    def _copy_tail(self, fd, start):
        with open(self.path, "rb") as old:
            old.seek(start)
            while True:
                data = old.read(READ_CHUNK)
                if not data:
                    break
                _write_fd(fd, data)
        os.fsync(fd)


def _write_lines(fd, lines):
    """Write many records with writev (no GIL held while the kernel copies them)."""
    for start in range(0, len(lines), WRITEV_MAX):
        part = lines[start:start + WRITEV_MAX]
        done = os.writev(fd, part)
        if done < sum(map(len, part)):  # a short write: the rest the plain way
            _write_fd(fd, b"".join(part)[done:])


def _write_fd(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(step):
    """Test-only: with HQ_GEVENT_TEST_COMPACT_PAUSE naming this step, log it and stall,
    so a fault test can SIGKILL the server exactly there. Inert when the variable is unset."""
    steps = os.environ.get(TEST_PAUSE_ENV)
    if steps and step in steps.split(","):
        log.warning("compaction paused at step: %s", step)
        gevent.sleep(3600)


def encode(record):
    return ujson.dumps(record, ensure_ascii=False, escape_forward_slashes=False).encode() + b"\n"


class LogReader:
    """Reads records back from the log by (offset, length): the keydir's way to a job's payload,
    output and the rest. Its own read-only descriptor stays valid after a compaction renames a
    new log over the path, so reads planned against the old offsets still find their records."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def read_many(self, spans):
        """[bytes] for [(offset, length)]: blocking, meant for the threadpool. An OSError is
        returned as the value (see WriteAheadLog._in_thread), a short read as an OSError."""
        try:
            out = []
            for offset, length in spans:
                data = os.pread(self.fd, length, offset)
                if len(data) != length:
                    raise OSError(f"{self.path}: a record at byte {offset} is cut short")
                out.append(data)
            return out
        except OSError as e:
            return e

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
