"""The hint file (Bitcask's): the keydir of a compacted log, so a start-up need not replay it.

    HQHINT 1\\n  <header JSON>\\n  <sections>  <32-byte BLAKE2b of everything before>

The header names the log it covers: its inode and device, the byte length covered, and a
digest of the last bytes of that length (a later compaction makes a new file; a log cut or
replaced by another shows a different tail). Sections are the keydir's columns as raw arrays
(array.tobytes) and its tables as JSON. A start-up trusts a hint only when every check holds;
otherwise it replays the whole log (never a wrong state, at worst a slower start).
"""
import hashlib
import os
import sys
from array import array

import ujson

from hq_gevent.keydir import Keydir, Strings

MAGIC = b"HQHINT 1\n"
TAIL_BYTES = 4096
CHUNK = 20000  # comments per JSON line: encoding yields between lines


class HintInvalid(Exception):
    """The hint file cannot be trusted for this log (the reason says why)."""


def log_identity(fd, covered):
    """(inode, device, digest of the `TAIL_BYTES` before `covered`) of an open log."""
    st = os.fstat(fd)
    start = max(0, covered - TAIL_BYTES)
    tail = os.pread(fd, covered - start, start)
    return st.st_ino, st.st_dev, hashlib.blake2b(tail, digest_size=16).hexdigest()


def encode(keydir, unique_of, identity, covered, pause=lambda: None):
    """The hint file of `keydir` (rows = the log's first `covered` bytes) as a list of parts
    (the columns themselves, not copies: the keydir must not change until write() is done);
    `pause()` is called between chunks so a caller can let others run."""
    inode, device, tail = identity
    sections = []  # (name, [parts])
    for name, _ in Keydir.COLUMNS:
        sections.append((name, [getattr(keydir, name)]))
    sections.append(("flags", [keydir.flags]))
    comments = []
    for start in range(0, len(keydir.comments), CHUNK):
        comments.append(_dumps(keydir.comments[start:start + CHUNK]) + b"\n")
        pause()
    sections.append(("comments", comments))
    sections.append(("nameTable", [_dumps(keydir.name_table.texts)]))
    sections.append(("urlTable", [_dumps(keydir.url_table.texts)]))
    sections.append(("unique", [_dumps([[job_id, key] for job_id, key in unique_of.items()])]))
    header = {
        "logBytes": covered, "logInode": inode, "logDevice": device, "logTail": tail, "rows": len(keydir),
        "byteorder": sys.byteorder, "itemsizes": {name: array(code).itemsize for name, code in Keydir.COLUMNS},
        "sections": [[name, sum(memoryview(p).nbytes for p in parts)] for name, parts in sections],
    }
    return [MAGIC + _dumps(header) + b"\n"] + [p for _, parts in sections for p in parts]


def write(path, parts):
    """Write `parts` and their checksum atomically: a crash leaves the old hint file or the new
    one, never a torn one. Blocking (hashing and I/O): meant for the threadpool."""
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        digest.update(part)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        for part in parts + [digest.digest()]:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path, log_fd):
    """(keydir, unique_of {id: key}, covered bytes) from the hint file at `path` for the open
    log `log_fd`; raises HintInvalid, or FileNotFoundError when there is none."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise HintInvalid("not a hint file, or cut short")
    body, digest = data[:-32], data[-32:]
    if hashlib.blake2b(body, digest_size=32).digest() != digest:
        raise HintInvalid("its checksum does not match (torn or altered)")
    header_end = body.index(b"\n", len(MAGIC))
    header = ujson.loads(body[len(MAGIC):header_end])
    covered = header["logBytes"]
    log_size = os.fstat(log_fd).st_size
    if covered > log_size:
        raise HintInvalid(f"it covers {covered} bytes but the log holds {log_size}")
    if (header["logInode"], header["logDevice"], header["logTail"]) != log_identity(log_fd, covered):
        raise HintInvalid("it was written for another log file (an older generation, or the log was replaced)")
    if header["byteorder"] != sys.byteorder or header["itemsizes"] != {
            name: array(code).itemsize for name, code in Keydir.COLUMNS}:
        raise HintInvalid("it was written on a machine with another array layout")
    sections, at = {}, header_end + 1
    for name, size in header["sections"]:
        sections[name] = body[at:at + size]
        at += size
    if at != len(body):
        raise HintInvalid("its sections do not add up to its length")
    keydir = Keydir()
    for name, code in Keydir.COLUMNS:
        column = array(code)
        column.frombytes(sections[name])
        setattr(keydir, name, column)
    keydir.flags = bytearray(sections["flags"])
    keydir.comments = [c for line in sections["comments"].split(b"\n") if line for c in ujson.loads(line)]
    keydir.name_table = Strings(sys.intern(t) for t in ujson.loads(sections["nameTable"]))
    keydir.url_table = Strings(sys.intern(t) for t in ujson.loads(sections["urlTable"]))
    unique_of = {job_id: key for job_id, key in ujson.loads(sections["unique"])}
    rows = header["rows"]
    if not all(len(c) == rows for c in (keydir.ids, keydir.offsets, keydir.lengths, keydir.finished,
                                        keydir.names, keydir.urls, keydir.flags, keydir.comments)):
        raise HintInvalid("its columns differ in length")
    _check_rows(keydir, log_fd, covered)
    return keydir, unique_of, covered


def _check_rows(keydir, log_fd, covered):
    """Spot checks: ids ascending, and a sample of rows points at whole records of their job."""
    ids, offsets, lengths = keydir.ids, keydir.offsets, keydir.lengths
    n = len(ids)
    for i in {*range(0, n, max(1, n // 16)), n - 1} if n else ():
        if not 0 <= offsets[i] <= covered - lengths[i]:
            raise HintInvalid(f"row {i} points past the end it covers")
        record = os.pread(log_fd, lengths[i], offsets[i])
        if not record.endswith(b"\n") or \
                not record.startswith(b'["p",%d,' % ids[i]):
            raise HintInvalid(f"row {i} does not point at the record of job {ids[i]}")
        if i and ids[i - 1] >= ids[i]:
            raise HintInvalid("its ids are not ascending")


def _dumps(value):
    return ujson.dumps(value, ensure_ascii=True, escape_forward_slashes=False).encode()
