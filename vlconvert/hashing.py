"""The checksums of the manifest and the journal: sha256 of every 64 MiB piece, hashed on every core.

A whole-file sha256 is one chain: one core hashes it, at 1.2-1.4 GiB/s on the machines users have, which
is slower than their NVMe disks and was the longest thread of a conversion (issue 21). A file's digest is
therefore the sha256 of each :data:`PIECE_BYTES` piece of it:

- a file of at most one piece (configs, tokenizers, most Megatron rank files of small models) has the
  plain ``sha256sum`` of the file, a string;
- a larger one has the list of its pieces' digests, in order; piece ``i`` is what
  ``dd if=FILE bs=64M skip=i count=1 | sha256sum`` prints.

Pieces are independent, so the hashing threads here hash them in parallel, a piece's bytes always on one
thread and in order (each thread has its own queue). The same split lets separate processes (torchrun
ranks) hash ranges of one file that start at piece boundaries. Memory: buffers wait here until hashed,
at most :data:`QUEUED_BYTES` of them in the whole process.

This module knows bytes and files; it imports nothing from vlconvert.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import queue
import threading
import zlib
from pathlib import Path
from typing import Union

PIECE_BYTES = 64 * 2**20  # bytes per hashed piece (the manifest records it as "piece_bytes")
MAX_QUEUED_BYTES = 128 * 2**20  # buffered bytes waiting for the hashing threads, in the whole process at most
QUEUED_BYTES = MAX_QUEUED_BYTES  # the bound now: a conversion's memory plan lowers it (engine.memory_plan)
READ_BLOCK = 4 * 2**20  # bytes a hashing thread reads at a time from a file it hashes itself
THREADS = max(1, min(8, os.cpu_count() or 1))  # hashing threads (sha256 scales to about 8 on 16 cores)

Digest = Union[str, list]  # noqa: UP007 - one piece: its hex digest; more: the list of the pieces' digests


class CrcPart:
    """The CRC-32 of a run of bytes that a hashing thread computes while it reads them (see
    :meth:`PieceHasher.update_range`); :meth:`result` waits for it."""

    __slots__ = ("crc", "length", "_done")

    def __init__(self, length: int, crc: int | None = None):
        self.length = length
        self.crc = crc or 0
        self._done = threading.Event()
        if crc is not None:
            self._done.set()

    def result(self) -> int:
        self._done.wait()
        return self.crc


class _Task:
    __slots__ = ("hasher", "piece", "data", "path", "offset", "size", "crc")

    def __init__(self, hasher: PieceHasher, piece: int, data: memoryview | None, path: Path | None = None,
                 offset: int = 0, size: int = 0, crc: CrcPart | None = None):
        self.hasher, self.piece, self.data = hasher, piece, data
        self.path, self.offset, self.size, self.crc = path, offset, size, crc


class _Pool:
    """The process's hashing threads, started on first use; thread ``i`` takes the tasks of queue ``i``."""

    def __init__(self) -> None:
        self._queues: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._room = threading.Condition()
        self._queued = 0  # buffered bytes waiting

    def _start(self) -> None:
        with self._lock:
            if self._queues:
                return
            queues = [queue.SimpleQueue() for _ in range(THREADS)]
            for i, q in enumerate(queues):
                threading.Thread(target=self._work, args=(q,), name=f"sha256 {i}", daemon=True).start()
            self._queues = queues

    def thread_for_next_piece(self) -> int:
        """The thread that hashes a new piece: round robin over the process, so files share the threads."""
        if not self._queues:
            self._start()
        return next(self._next) % len(self._queues)

    def submit(self, thread: int, task: _Task) -> None:
        if task.data is not None:
            size = len(task.data)
            with self._room:
                # one buffer is always let through, so a buffer larger than the bound cannot wait forever
                while self._queued and self._queued + size > QUEUED_BYTES:
                    self._room.wait()
                self._queued += size
        self._queues[thread].put(task)

    def _work(self, tasks: queue.SimpleQueue) -> None:
        buffer: bytearray | None = None
        while True:
            task: _Task = tasks.get()
            hasher = task.hasher
            try:
                if hasher.error is None:
                    piece = hasher.pieces[task.piece]
                    if task.data is not None:
                        piece.update(task.data)
                    else:
                        if buffer is None:
                            buffer = bytearray(READ_BLOCK)
                        _hash_range(piece, task, memoryview(buffer))
            except BaseException as exc:  # noqa: BLE001 - handed to the thread that asks for the digest
                hasher.error = hasher.error or exc
            finally:
                if task.crc is not None:
                    task.crc._done.set()  # noqa: SLF001 - set by the thread that computed it
                if task.data is not None:
                    with self._room:
                        self._queued -= len(task.data)
                        self._room.notify_all()
                    task.data = None
                hasher.done_one()


def _hash_range(piece: hashlib._Hash, task: _Task, buffer: memoryview) -> None:
    assert task.path is not None
    fd = os.open(task.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        done = 0
        while done < task.size:
            want = min(len(buffer), task.size - done)
            n = os.preadv(fd, [buffer[:want]], task.offset + done)
            if not n:
                raise ShortFile(task.path, task.offset + done)
            piece.update(buffer[:n])
            if task.crc is not None:
                task.crc.crc = zlib.crc32(buffer[:n], task.crc.crc)
            done += n
    finally:
        os.close(fd)


class ShortFile(OSError):
    """A file ended before the bytes being hashed (it was truncated while read)."""

    def __init__(self, path: Path, at: int):
        super().__init__(f"'{path}' ended at byte {at} while it was being hashed")
        self.path, self.at = path, at


_POOL = _Pool()


def _pool() -> _Pool:
    return _POOL


class PieceHasher:
    """The :data:`Digest` of bytes given in order (:meth:`update`, :meth:`update_range`), hashed in parallel.

    Calls must come from one thread at a time (one writer per file). Buffers handed over must not change
    until :meth:`digest` returns (vlconvert's writers hand over fresh buffers)."""

    def __init__(self, start: int = 0) -> None:
        if start % PIECE_BYTES:
            raise ValueError(f"a hashed range starts at a piece boundary, not at byte {start}")
        self.first = start // PIECE_BYTES  # the file's piece that self.pieces[0] is
        self.pieces: list = []
        self.size = start  # the file position the next bytes handed over have
        self.error: BaseException | None = None
        self._threads: list[int] = []
        self._pending = 0
        self._done = threading.Condition()

    def done_one(self) -> None:
        with self._done:
            self._pending -= 1
            if not self._pending:
                self._done.notify_all()

    def _segments(self, size: int):
        """(piece, start within the given bytes, length) of the next ``size`` bytes, opening pieces as needed."""
        start = 0
        while start < size:
            index, within = divmod(self.size, PIECE_BYTES)
            index -= self.first
            if index == len(self.pieces):
                self.pieces.append(hashlib.sha256())
                self._threads.append(_pool().thread_for_next_piece())
            length = min(PIECE_BYTES - within, size - start)
            yield index, start, length
            start += length
            self.size += length

    def _submit(self, task: _Task) -> None:
        with self._done:
            self._pending += 1
        _pool().submit(self._threads[task.piece], task)

    def update(self, data: memoryview) -> None:
        """Hash the bytes of ``data`` (a byte view) next."""
        for index, start, length in self._segments(len(data)):
            self._submit(_Task(self, index, data[start:start + length]))

    def update_range(self, path: str | Path, offset: int, size: int, crc: bool = False) -> list[CrcPart]:
        """Hash bytes ``offset:offset+size`` of the file ``path`` next (the hashing threads read them). With
        ``crc``, the threads also compute the CRC-32 of what they read: one :class:`CrcPart` per piece the
        range touches, in order (combine them with :func:`crc32_combine`)."""
        parts = []
        for index, start, length in self._segments(size):
            part = CrcPart(length) if crc else None
            if part is not None:
                parts.append(part)
            self._submit(_Task(self, index, None, Path(path), offset + start, length, part))
        return parts

    def wait(self) -> None:
        """Wait until everything handed over is hashed; raise the first error a hashing thread met."""
        with self._done:
            while self._pending:
                self._done.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def digest(self) -> Digest:
        """The digest of everything handed over (waits for the hashing threads)."""
        self.wait()
        if len(self.pieces) <= 1 and not self.first:
            return (self.pieces[0] if self.pieces else hashlib.sha256()).hexdigest()
        return [piece.hexdigest() for piece in self.pieces]

    def pieces_hex(self) -> list[str]:
        """The digest of each piece handed over, in order (waits for the hashing threads)."""
        self.wait()
        return [piece.hexdigest() for piece in self.pieces]


# ------------------------------------------------------------------------------- CRC-32 combination
_CRC_POLY = 0xEDB88320  # zlib's CRC-32, reflected


def _multiply(a: int, b: int) -> int:
    """``a * b`` modulo the CRC-32 polynomial (reflected bit order, as zlib's ``multmodp``)."""
    m, product = 1 << 31, 0
    while True:
        if a & m:
            product ^= b
            if (a & (m - 1)) == 0:
                return product
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


@functools.lru_cache(maxsize=64)
def _x_to_the_8n(n: int) -> int:
    """x^(8n) modulo the CRC-32 polynomial: what appending ``n`` zero bytes multiplies a CRC by."""
    result, power, k = 1 << 31, 1 << 30, 3  # x^0 and x^1 (reflected); n bytes are 2^3 n bits
    for _ in range(k):
        power = _multiply(power, power)
    while n:
        if n & 1:
            result = _multiply(power, result)
        n >>= 1
        power = _multiply(power, power)
    return result


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's ``crc32_combine``, which
    Python's zlib does not expose): lets threads compute the CRCs of consecutive runs independently."""
    return _multiply(_x_to_the_8n(length2), crc1) ^ crc2 if length2 else crc1


def piece_digests(path: str | Path, pieces: list[int], size: int) -> dict[int, str]:
    """The sha256 of the given pieces of a file of ``size`` bytes, read back from it (on the hashing threads)."""
    hashers = {}
    for i in pieces:
        hasher = hashers[i] = PieceHasher(i * PIECE_BYTES)
        hasher.update_range(path, i * PIECE_BYTES, min(PIECE_BYTES, size - i * PIECE_BYTES))
    return {i: h.pieces_hex()[0] for i, h in hashers.items()}


def file_digest(path: str | Path) -> Digest:
    """The :data:`Digest` of a whole file, its pieces hashed in parallel."""
    hasher = PieceHasher()
    hasher.update_range(path, 0, os.stat(path).st_size)
    return hasher.digest()


def file_sha256(path: str | Path) -> str:
    """The plain sha256 of a whole file (one chain; what manifests of vlconvert 0.2 recorded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK * 4):
            h.update(block)
    return h.hexdigest()


def is_digest(value: object) -> bool:
    """Whether ``value`` has the form of a :data:`Digest` (a hex string, or a list of at least two)."""
    def hex64(v: object) -> bool:
        return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    return hex64(value) or (isinstance(value, list) and len(value) >= 2 and all(map(hex64, value)))


def pieces_of(size: int) -> int:
    """How many pieces a file of ``size`` bytes has (at least one)."""
    return max(1, -(-size // PIECE_BYTES))


def _forget_threads_in_child() -> None:
    global _POOL
    _POOL = _Pool()  # a forked child has none of the parent's threads: start its own on first use


os.register_at_fork(after_in_child=_forget_threads_in_child)
