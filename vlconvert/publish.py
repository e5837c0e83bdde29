"""Publishing an output folder safely: overlap checks, one writer per DST, staging, manifest, resume.

Every command that writes goes through :func:`staged_output`:

1. **Overlap**: DST may not equal, contain or lie inside any input (after resolving symlinks), with or
   without ``--overwrite``; nothing is written before this check.
2. **One run per DST**: an exclusive lock (``.DST.vlconvert-lock`` beside DST, ``flock``) is held for the
   whole run, so a second run on the same DST stops at once with one line.
3. **Staging**: files are written into ``.DST.vlconvert-partial`` beside DST through :func:`create_file`,
   which hashes them (sha256 of each 64 MiB piece, :mod:`vlconvert.hashing`) while they are written;
   each finished file is appended (flushed) to ``.DST.vlconvert-journal`` beside it, whose first line
   holds the command and its options. A staging folder left by a dead run is removed, or, with
   ``--resume``, reused: files whose checksums still match the journal are kept and the writers skip
   them (:func:`kept_state`).
4. **Manifest**: ``vlconvert-manifest.json`` (every file's size and sha256, per piece for large files)
   is written last.
5. **Publish**: the finished folder is renamed to DST only if DST is still absent (``renameat2`` with
   ``RENAME_NOREPLACE`` where the kernel has it), or, with ``--overwrite``, still the folder that was
   checked at the start. Every file and folder is synced to disk first (:func:`sync_files`). On any
   failure the staging folder is removed, so DST never looks complete unless it is.

This module knows paths and bytes, not tensors; it imports nothing from the rest of vlconvert but errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import os
import queue
import shutil
import socket
import sys
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from vlconvert.errors import UserError
from vlconvert.hashing import (
    PIECE_BYTES,
    CrcPart,
    Digest,
    PieceHasher,
    ShortFile,
    crc32_combine,
    file_digest,
    file_sha256,
    is_digest,
    pieces_of,
)

MANIFEST_NAME = "vlconvert-manifest.json"
_HASH_BLOCK = 16 * 2**20
BACKGROUND_MIN = 2**20  # buffers this large are written by a background thread (see OutputFile)
QUEUE_DEPTH = 2  # buffers queued for that thread at most: memory is this many blocks more
COPY_CHUNK = 4 * 2**20  # bytes the checksum thread reads at a time from a copied range (see copy_range)
# errors of copy_file_range that mean "not between these files" (another file system, an old kernel, a
# special file): the range is then copied through memory; ENOSPC, EIO and the rest are real errors
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}

_ACTIVE: dict[Path, Stage] = {}  # staging folder -> its Stage, for create_file / kept_state
WRITEBACK_STEP = 32 * 2**20  # written bytes after which the write thread starts their writeback


# ------------------------------------------------------------------------------------------ paths
def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


_CACHE_REPOS = ("models--", "datasets--", "spaces--")  # Hugging Face cache repository folders
_WALK_LIMIT = 200_000  # entries looked at under one input: far above any checkpoint (a bound, not a rule)


def checkpoint_root(folder: str | Path) -> Path:
    """The folder a checkpoint's files may live in: ``folder`` with every symlink resolved, or, for a
    Hugging Face cache snapshot (``models--ORG--NAME/snapshots/REV``, or a folder inside one), the whole
    repository, whose ``blobs/`` the snapshot's files link into."""
    real = _real(folder)
    for path in (real, *real.parents):
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith(_CACHE_REPOS):
            return path.parent.parent
    return real


def input_paths(path: str | Path) -> list[tuple[Path, str]]:
    """Everything a run that reads the input ``path`` may open, as real paths (every symlink resolved), each
    with how it is reached ("" for ``path`` itself): ``path``; its Hugging Face cache repository; the target
    of every symlink found under it (``release/``, a rank folder or file, ``.metadata``, a snapshot's blobs),
    linked folders being walked in turn. This is what "an input" means for :func:`check_no_overlap`."""
    real = _real(path)
    found: dict[Path, str] = {real: ""}
    root = checkpoint_root(path)
    if root != real:
        found[root] = "the Hugging Face cache repository"
    pending, walked, seen = [real], set(), 0
    while pending and seen < _WALK_LIMIT:
        folder = pending.pop()
        if folder in walked:
            continue
        walked.add(folder)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # a file, or a folder the run cannot read either
            continue
        for entry in entries:
            seen += 1
            try:
                if entry.is_symlink():
                    target = _real(entry.path)
                    found.setdefault(target, f"the target of the link '{entry.path}'")
                    if target.is_dir():
                        pending.append(target)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
            except OSError:
                continue
    return list(found.items())


# ----------------------------------------------------------------------------- what readers open
class InputLog:
    """The files and folders one reader (a :class:`~vlconvert.sources.Source` and the readers under it) opens,
    recorded by :func:`note_input` as real paths, each with the path as it was opened. A log is live while
    its source is (the source holds it) and until :meth:`close`; :func:`staged_output` treats everything
    every live log holds as an input, whatever the command declared (overlap, and ``--resume``'s
    fingerprint): a reader that opens something no option names cannot bypass the input rule."""

    def __init__(self) -> None:
        self.paths: dict[Path, str] = {}
        self.closed = False
        with _LOG_LOCK:
            _LOGS.add(self)

    def close(self) -> None:
        self.closed = True


_LOGS: weakref.WeakSet[InputLog] = weakref.WeakSet()
_LOG_LOCK = threading.Lock()


def note_input(path: str | Path) -> Path:
    """The hook every reader calls as it opens an input file or lists an input folder: ``path`` is recorded
    in every open :class:`InputLog`, with every symlink on the way resolved, and so is the place of its
    own name (a link inside the checkpoint is an input too). Returns ``path``."""
    with _LOG_LOCK:
        logs = [log for log in _LOGS if not log.closed]
    if logs:
        text = os.path.abspath(os.path.expanduser(str(path)))
        places = {_real(text), Path(os.path.realpath(os.path.dirname(text))) / os.path.basename(text)}
        with _LOG_LOCK:
            for log in logs:
                for place in places:
                    log.paths.setdefault(place, text)
    return Path(path)


def open_input(path: str | Path, mode: str = "rb") -> Any:
    """``open(path, mode)`` for a reader, recorded by :func:`note_input` first."""
    return open(note_input(path), mode)  # noqa: SIM115 - the caller closes it


def read_inputs() -> list[tuple[Path, str]]:
    """Every path the open :class:`InputLog` s hold (real path, as opened), in a stable order."""
    with _LOG_LOCK:
        found: dict[Path, str] = {}
        for log in _LOGS:
            if not log.closed:
                for path, text in log.paths.items():
                    found.setdefault(path, text)
    return sorted(found.items())


def check_inside(path: str | Path, folder: str | Path) -> None:
    """Refuse to read ``path`` (a file of the checkpoint ``folder``) if, symlinks resolved, it lies outside the
    checkpoint (:func:`checkpoint_root`: a cache snapshot's blobs are inside its repository)."""
    real = _real(path)
    if not _within(real, checkpoint_root(folder)):
        raise UserError(f"'{path}' is a symlink to '{real}', outside the checkpoint '{folder}': refusing to read "
                        "it (copy the file into the checkpoint if it belongs there)")


def check_no_overlap(dst: str | Path, inputs: dict[str, str | Path | None], name: str = "output",
                     read: list[tuple[Path, str]] | None = None) -> None:
    """Refuse a DST that equals, contains or lies inside any input, after resolving symlinks.

    ``inputs`` maps a label for the message (``"SRC"``, ``"--assets-dir"``) to a path; ``None`` is skipped;
    ``name`` names DST in the message (``"--data-out"``).
    Each input stands for everything :func:`input_paths` finds under it (the targets of its symlinks, a
    cache snapshot's repository), so an output can never replace a file a run reads through a link.
    ``read``: what the readers opened (:func:`read_inputs`), inputs too, whether or not an option names them.
    """
    target = _real(dst)
    given = [(label, path) for label, path in inputs.items() if path is not None]
    # the paths typed first (their messages name them), then what they reach through links
    covered = [(_real(path), f"the input {label} '{path}'", None) for label, path in given]
    for label, path in given:
        for source, how in input_paths(path):
            if how:
                whose = f"{how} {'of' if how.startswith('the Hugging') else 'in'} the input {label} '{path}'"
                covered.append((source, whose, f"'{source}', {whose}"))
    for source, text in read or []:
        whose = f"'{source}', which this run reads" + (f" (as '{text}')" if text != str(source) else "")
        covered.append((source, whose, None))
    for source, whose, what in covered:
        if target == source:
            raise UserError(f"{name} '{dst}' is {whose}: choose another output folder")
        if _within(target, source):
            raise UserError(f"{name} '{dst}' is inside {what or whose}: choose a folder outside it")
        if _within(source, target):
            raise UserError(f"{name} '{dst}' contains {what or whose}: choose another output folder")
    here = _real(Path.cwd())
    if _within(here, target):
        raise UserError(f"{name} '{dst}' contains the current directory: choose another output folder")
    if target == _real(Path.home()) or target.parent == target:
        raise UserError(f"{name} '{dst}' is a home or root folder: choose another output folder")


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before writing when the file system holding ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"not enough disk space in '{folder}': need {_gib(needed)}, {_gib(free)} free")


def _gib(n: int) -> str:
    """Bytes in GiB (binary units, as every size vlconvert prints)."""
    return f"{n / 2**30:.2f} GiB"


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What DST is (device, inode, change time), or None if absent: a replaced folder differs even if its
    inode number is reused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (atomically where possible)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):  # the file system lacks RENAME_NOREPLACE: fall back
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ------------------------------------------------------------------------------------------ locks
class _Lock:
    """An exclusive ``flock`` on a file beside DST, held for the whole run and removed at the end."""

    def __init__(self, path: Path, dst: Path):
        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"another vlconvert run ({holder}) is writing '{dst}': wait for it to finish "
                                "or choose another output folder") from None
            st = os.fstat(fd)
            if _identity(path) == (st.st_dev, st.st_ino, st.st_ctime_ns):
                break
            os.close(fd)  # the file was removed by the previous holder between open and lock: try again
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


# ----------------------------------------------------------------------------------- hashed files
class OtherRanksBytes(Exception):
    """A CRC-32 was asked for over bytes that other ranks write (a split file, see :class:`Part`): it is known
    only after the ranks exchange their parts (:meth:`Checksum.resolve`)."""


class Checksum:
    """A running CRC-32 that :class:`OutputFile` computes off the caller's thread (see ``write(crc=)``).

    Buffers are added by the checksum thread; copied ranges by the hashing threads as they read them
    (:class:`~vlconvert.hashing.CrcPart`), folded in order with :func:`~vlconvert.hashing.crc32_combine`
    when :attr:`value` is read (which waits for them).

    In a file split over ranks, the checksum of a streamed record (:meth:`OutputFile.write_blocks`) knows the
    record (``record``: its first byte in the file and its size) and which of its bytes it saw (``seen_from``,
    ``length``); its :attr:`value` is then the whole record's only if this rank saw all of it, or once
    :meth:`resolve` gave the value the ranks' parts combine to."""

    def __init__(self) -> None:
        self._value = 0
        self._parts: list[CrcPart] = []
        self.length = 0
        self.record: tuple[int, int] | None = None
        self.seen_from = 0
        self._resolved: int | None = None

    def add(self, view: memoryview) -> None:
        """Advance over ``view``, after everything added before it."""
        self.length += len(view)
        if self._parts:
            self._parts.append(CrcPart(len(view), zlib.crc32(view)))
        else:
            self._value = zlib.crc32(view, self._value)

    def add_parts(self, parts: list[CrcPart]) -> None:
        """Advance over runs whose CRCs other threads compute, after everything added before them."""
        self.length += sum(part.length for part in parts)
        self._parts.extend(parts)

    def local(self) -> int:
        """The CRC-32 of the bytes added here (waits for the parts still being computed)."""
        for part in self._parts:
            self._value = crc32_combine(self._value, part.result(), part.length)
        self._parts.clear()
        return self._value

    def resolve(self, value: int) -> None:
        """The record's CRC-32, combined from every rank's part of it."""
        self._resolved = value

    @property
    def value(self) -> int:
        """The CRC-32 of the record (of everything added, outside a split file)."""
        if self._resolved is not None:
            return self._resolved
        if self.record is not None and (self.seen_from or self.length != self.record[1]):
            raise OtherRanksBytes(f"record at byte {self.record[0]}")
        return self.local()


class Part:
    """This process's bytes ``start:stop`` of an output file that several ranks of ``torchrun`` write at once
    (``stop`` None: to the end). What the rank could not finish alone is kept here until the ranks have met
    (:mod:`vlconvert.splitting`): the CRC-32s of records it saw part of, the late bytes that need other ranks'
    CRC-32s (``holes``), and the pieces it could not hash (a piece another rank writes part of, or a hole)."""

    def __init__(self, start: int, stop: int | None):
        self.start, self.stop = start, stop
        self.records: list[Checksum] = []  # every streamed record of the file, in order
        self.holes: list[tuple[Callable[[], bytes], int, int, int]] = []  # make, record pos, lo, hi
        self.dirty: set[int] = set()  # pieces whose streamed digest is wrong (a hole was zeros)
        self.hashed: dict[int, str] = {}  # piece -> digest, streamed
        self.size = 0  # the whole file's size (every rank walks all of it)
        self.state: Any = None

    def clip(self, pos: int, size: int) -> tuple[int, int]:
        """The part of bytes ``pos:pos+size`` in this share (empty: lo >= hi)."""
        hi = pos + size if self.stop is None else min(pos + size, self.stop)
        return max(pos, self.start), hi

    @property
    def hash_start(self) -> int:
        """The first piece boundary at or after the start: pieces from there on are hashed while written."""
        return -(-self.start // PIECE_BYTES) * PIECE_BYTES

    @property
    def hash_stop(self) -> int | None:
        """Where streamed hashing stops: the last piece boundary before ``stop`` (None: the end of the file)."""
        return None if self.stop is None else self.stop // PIECE_BYTES * PIECE_BYTES


class OutputFile(io.RawIOBase):
    """A file being written into a stage, hashed (sha256) as its bytes go by, journaled when closed.

    Bytes move through two background threads so that producing, checksumming and writing overlap
    (hashlib, zlib and ``write`` release the GIL): the checksum thread runs the CRC-32s callers ask for and
    hands each buffer, in order, to the process's hashing threads (:class:`~vlconvert.hashing.PieceHasher`:
    64 MiB pieces hashed in parallel), the write thread writes it. At most :data:`QUEUE_DEPTH` buffers
    wait at each step (and :data:`~vlconvert.hashing.QUEUED_BYTES` for hashing), so memory is a few
    blocks. A caller must not change a buffer after handing it over (vlconvert's writers hand over fresh
    tensors); buffers under :data:`BACKGROUND_MIN` bytes, and
    views that own nothing, are copied first. Bytes that depend on checksums of earlier bytes (a zip data
    descriptor) are handed over as a function with their size (:meth:`write_later`). An error in a thread
    (a full disk) is raised by the next call here.

    A range of an input file that goes to the output unchanged is handed over as its place
    (:meth:`copy_range`): the write thread copies it inside the kernel (``os.copy_file_range``, as
    ``cp`` does) and the hashing threads read it, each its pieces (the checksum thread reads it too if a
    CRC-32 is asked for).

    Writers that write strictly in order are hashed without re-reading; one that seeks back (none of
    vlconvert's do) is re-read once at close. ``state`` is plain JSON a writer needs to skip this file on
    ``--resume`` (e.g. the DCP records it holds).
    """

    def __init__(self, path: Path, stage: Stage | None, rel: str, part: Part | None = None):
        super().__init__()
        self.path = path
        self.stage = stage
        self.rel = rel
        self.state: Any = None
        self.part = part
        if part is None:
            self._f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        else:  # other ranks write the rest of this file at the same time: never truncate it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            self._f = open(fd, "wb", buffering=0)  # noqa: SIM115 - a descriptor is not truncated
        self._hash = PieceHasher(part.hash_start if part else 0)
        self._pos = 0
        self._in_order = True
        self._to_check: queue.Queue | None = None
        self._to_write: queue.Queue | None = None
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._drain()
        self._pos = self._f.seek(pos, whence)
        return self._pos

    def write(self, data: Any, crc: Checksum | None = None) -> int:
        """Queue ``data`` (a buffer) to be hashed and written; ``crc`` is advanced over it, in order."""
        view = memoryview(data).cast("B")
        if len(view) < BACKGROUND_MIN or view.obj is None:
            # the caller may reuse a small buffer; a view without an owner (torch.save's writes) may be
            # freed as soon as this returns
            view = memoryview(bytes(view))
        self._put((self._pos, view, crc), len(view))
        return len(view)

    def write_later(self, size: int, make: Callable[[], bytes]) -> int:
        """Queue ``size`` bytes that ``make()`` returns once every earlier buffer has been checksummed."""
        self._put((self._pos, make, size), size)
        return size

    def copy_range(self, path: str | Path, offset: int, size: int, crc: Checksum | None = None) -> int:
        """Queue bytes ``offset:offset+size`` of input file ``path`` to be written here unchanged (a kernel
        copy); ``crc`` is advanced over them, in order. An input that ends early is one :class:`UserError`."""
        if size:
            self._put((self._pos, _Range(Path(path), offset, size), crc), size)
        return size

    def write_blocks(self, size: int, blocks: Iterable[Any], crc: Checksum | None = None) -> int:
        """Queue one record of ``size`` bytes given in order as buffers or spans of input files (objects with
        ``path``, ``offset`` and ``nbytes``: copied, see :meth:`copy_range`); ``crc`` is advanced over it.
        In a file split over ranks, a record wholly outside this rank's share is never produced, blocks past
        the share's end are not asked for (those before its start are, and dropped), and ``crc`` learns which
        part of the record it saw."""
        start, part = self._pos, self.part
        if part is not None:
            lo, hi = part.clip(start, size)
            if crc is not None:
                crc.record, crc.seen_from = (start, size), min(max(lo - start, 0), size)
                part.records.append(crc)
            if lo >= hi:
                self._pos += size
                return size
        written = 0
        for block in blocks:
            if part is not None and part.stop is not None and self._pos >= part.stop:
                self._pos = start + size  # the rest is another rank's
                return size
            if hasattr(block, "path"):
                written += self.copy_range(block.path, block.offset, block.nbytes, crc=crc)
            else:
                written += self.write(memoryview(block).cast("B"), crc=crc)
        return written

    def _put(self, item: tuple, size: int) -> None:
        if self._error is not None:
            self._raise()
        if self.part is not None:  # only this rank's bytes go on
            pos, data, extra = item
            lo, hi = self.part.clip(pos, size)
            if lo >= hi:
                self._pos += size
                return
            if isinstance(data, _Range):
                data = _Range(data.path, data.offset + lo - pos, hi - lo)
            elif callable(data):
                data, extra = _Late(data, pos, size, lo, hi), hi - lo
            else:
                data = data[lo - pos:hi - pos]
            item = (lo, data, extra)
            self._pos += size - (hi - lo)
            size = hi - lo
        if not self._threads:
            self._to_check, self._to_write = queue.Queue(maxsize=QUEUE_DEPTH), queue.Queue(maxsize=QUEUE_DEPTH)
            self._threads = [threading.Thread(target=target, name=f"{what} {self.rel}", daemon=True)
                             for target, what in ((self._check_queued, "checksum"), (self._write_queued, "write"))]
            for thread in self._threads:
                thread.start()
        assert self._to_check is not None
        self._to_check.put(item)
        self._pos += size

    def _check_queued(self) -> None:
        """Checksum thread: hash (and CRC) queued buffers in order, resolve late bytes, pass them on."""
        assert self._to_check is not None and self._to_write is not None
        inputs = _Inputs()
        try:
            while (item := self._to_check.get()) is not None:
                if self._error is not None:
                    continue  # drain without work
                pos, data, extra = item
                try:
                    if isinstance(data, _Range):
                        self._take_range(pos, data, extra, inputs)
                    else:
                        if callable(data):
                            data = self._late(data, pos, extra)
                            extra = None
                        self._checksum(pos, data, extra)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc
                    continue
                self._to_write.put((pos, data))
        finally:
            inputs.close()
            self._to_write.put(None)

    def _late(self, make: Callable[[], bytes], pos: int, size: int) -> memoryview:
        """The late bytes ``make()`` gives; in a split file, zeros where they need other ranks' CRC-32s (a
        hole, filled once the ranks have met; the pieces it touches are hashed again then)."""
        try:
            data = memoryview(make()).cast("B")
        except OtherRanksBytes:
            assert self.part is not None and isinstance(make, _Late)
            self.part.holes.append((make.make, make.pos, make.lo, make.hi))
            self.part.dirty.update(range(make.lo // PIECE_BYTES, (make.hi - 1) // PIECE_BYTES + 1))
            data = memoryview(bytes(size))
        if len(data) != size:
            raise RuntimeError(f"{self.rel}: {len(data)} late bytes, {size} announced")
        return data

    def _hash_bounds(self, pos: int, size: int) -> tuple[int, int]:
        """The bytes of ``pos:pos+size`` this process hashes while writing (all of them outside a split file;
        in one, those in the whole pieces of its share)."""
        if self.part is None:
            return pos, pos + size
        stop = self.part.hash_stop
        lo, hi = max(pos, self.part.hash_start), pos + size if stop is None else min(pos + size, stop)
        return (lo, hi) if lo < hi else (pos, pos)

    def _checksum(self, pos: int, view: memoryview, crc: Checksum | None) -> None:
        if crc is not None:
            crc.add(view)
        lo, hi = self._hash_bounds(pos, len(view))
        if lo == hi:
            return
        if lo == self._hash.size and self._in_order:
            # hashed by the hashing threads (the buffer is not changed after write())
            self._hash.update(view[lo - pos:hi - pos])
        else:
            self._in_order = False

    def _take_range(self, pos: int, r: _Range, crc: Checksum | None, inputs: _Inputs) -> None:
        """Hand a copied range to the hashing threads, which compute ``crc`` over it too; bytes they do not
        hash (the file is no longer written in order: it is hashed at close; or outside the whole pieces of a
        split file's share) are read here for the CRC."""
        lo, hi = self._hash_bounds(pos, r.size)
        in_order = lo < hi and lo == self._hash.size and self._in_order
        if lo < hi and not in_order:
            self._in_order = False
        runs = ((pos, lo), (lo, hi), (hi, pos + r.size)) if in_order else ((pos, pos + r.size),)
        for a, b in runs:
            if a >= b:
                continue
            if in_order and a == lo:
                parts = self._hash.update_range(r.path, r.offset + a - pos, b - a, crc=crc is not None)
                if crc is not None:
                    crc.add_parts(parts)
            elif crc is not None:
                for view in inputs.chunks(_Range(r.path, r.offset + a - pos, b - a)):
                    crc.add(view)

    def _write_queued(self) -> None:
        """Write thread: write queued buffers at their positions until ``None``; keep the first error."""
        assert self._to_write is not None
        inputs, writeback = _Inputs(), _Writeback(self._f.fileno())
        try:
            while (item := self._to_write.get()) is not None:
                if self._error is not None:
                    continue  # drain without writing
                pos, data = item
                try:
                    if isinstance(data, _Range):
                        inputs.copy(data, self._f, pos)
                        writeback.advance(pos + data.size)
                        continue
                    if self._f.tell() != pos:
                        self._f.seek(pos)
                    written = 0
                    while written < len(data):  # raw writes may be short
                        written += self._f.write(data[written:]) or 0
                    writeback.advance(pos + written)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc
        finally:
            inputs.close()

    def _drain(self) -> None:
        """Wait until every queued buffer is written; raise a background thread's error, if any."""
        if self._threads:
            assert self._to_check is not None
            self._to_check.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []
            self._to_check = self._to_write = None
        if self._error is not None:
            self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        assert error is not None
        raise error

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        if not self._f.closed:
            self._drain()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        if self.part is not None:
            self._close_part(self.part)
            return
        size = self._f.seek(0, os.SEEK_END)
        super().close()
        self._f.close()
        if self.stage is not None:
            try:
                if self._in_order and self._hash.size == size:
                    digest = self._hash.digest()
                else:
                    self._hash.wait()
                    digest = file_digest(self.path)
                    self.stage.rehashed.append(self.rel)
            except ShortFile as exc:
                raise UserError(f"{exc}: it changed while this run read it; nothing was published") from exc
            self.stage.journal(self.rel, size, digest, self.state)

    def _close_part(self, part: Part) -> None:
        """A split file's share is finished: kept in the stage (``stage.parts``) until the ranks meet; rank 0
        journals the whole file then (:func:`vlconvert.splitting.finish_parts`)."""
        super().close()
        self._f.close()
        part.size, part.state = self._pos, self.state
        try:
            digests = self._hash.pieces_hex() if self._in_order else []
        except ShortFile as exc:
            raise UserError(f"{exc}: it changed while this run read it; nothing was published") from exc
        stop = self._hash.size  # whole pieces only: the last one ends at the share's end or at the file's
        part.hashed = {self._hash.first + i: d for i, d in enumerate(digests)
                       if (self._hash.first + i + 1) * PIECE_BYTES <= stop or stop == part.size}
        for piece in part.dirty:
            part.hashed.pop(piece, None)
        if self.stage is not None and self.stage.active:
            self.stage.parts[self.rel] = part

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leaving a ``with`` block by an exception closes without journaling: a partly written file must
        never be recorded as finished (``--resume`` would keep it)."""
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Close without journaling (the caller is failing)."""
        if self._threads:
            with contextlib.suppress(BaseException):
                self._drain()
        if not self.closed:
            super().close()
            self._f.close()


class _Late:
    """Late bytes (:meth:`OutputFile.write_later`) of a split file at ``pos:pos+size``, of which this rank
    writes ``lo:hi``."""

    __slots__ = ("make", "pos", "size", "lo", "hi")

    def __init__(self, make: Callable[[], bytes], pos: int, size: int, lo: int, hi: int):
        self.make, self.pos, self.size, self.lo, self.hi = make, pos, size, lo, hi

    def __call__(self) -> memoryview:
        data = memoryview(self.make()).cast("B")
        if len(data) != self.size:
            raise RuntimeError(f"{len(data)} late bytes, {self.size} announced")
        return data[self.lo - self.pos:self.hi - self.pos]


class _Range:
    """Bytes ``offset:offset+size`` of an input file, queued by :meth:`OutputFile.copy_range`."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: Path, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None  # not Linux: writeback is left to the kernel, fdatasync at the end
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages, do not wait


class _Writeback:
    """Starts writing a file's bytes to disk while the file is being written, instead of when the kernel's
    dirty-page thresholds are reached (gigabytes later): the disk works from the first block, and the
    ``fdatasync`` before publishing (:func:`sync_files`) has little left to wait for. Without
    ``sync_file_range`` (not Linux) the kernel decides."""

    def __init__(self, fd: int):
        self.fd = fd
        self.started = 0  # writeback asked for bytes [0, started)

    def advance(self, end: int) -> None:
        """Bytes up to ``end`` are written: start their writeback every :data:`WRITEBACK_STEP` bytes."""
        if _SYNC_FILE_RANGE is None or end - self.started < WRITEBACK_STEP:
            return
        _SYNC_FILE_RANGE(self.fd, self.started, end - self.started, _SFR_WRITE)  # asynchronous
        self.started = end


def sync_files(paths: list[Path]) -> None:
    """``fdatasync`` each file, then ``fsync`` each folder holding one: all on disk before a publish (a full
    disk or an I/O error that the kernel's writeback met is raised here)."""
    folders: set[Path] = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise  # staged_output says "disk full"
            raise UserError(f"cannot write '{path}' to disk: {exc.strerror or exc}; nothing was published") from exc
        folders.add(path.parent)
    for folder in sorted(folders):
        fsync_folder(folder)


_NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM}


def fsync_folder(folder: Path, outcome: str = "nothing was published") -> None:
    """Make the names in ``folder`` durable (a no-op where folders cannot be opened or the file system
    refuses fsync on a folder); an I/O error is one line naming the folder and ``outcome``."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_SYNC:  # some file systems refuse fsync on a folder: not an error
            raise UserError(f"cannot write the folder '{folder}' to disk: {exc.strerror or exc}; {outcome}") from exc
    finally:
        os.close(fd)


def kernel_copy(src: int, dst: int, size: int, src_offset: int, dst_offset: int) -> int:
    """``os.copy_file_range`` (a name the tests can replace to fill the disk)."""
    return os.copy_file_range(src, dst, size, src_offset, dst_offset)


class _Inputs:
    """Input files a background thread of :class:`OutputFile` reads ranges from, opened once each, and the
    one buffer that thread reads them into."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._buffer: memoryview | None = None
        self._kernel = True  # copy_file_range works between these files (until it says otherwise)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(note_input(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from exc
        return fd

    def _short(self, r: _Range, done: int) -> UserError:
        return UserError(f"'{r.path}' is truncated: it ended at byte {r.offset + done} while {r.size} bytes "
                         f"from byte {r.offset} were being copied")

    def chunks(self, r: _Range) -> Iterator[memoryview]:
        """The range read :data:`COPY_CHUNK` bytes at a time (each view is valid until the next)."""
        if self._buffer is None:
            self._buffer = memoryview(bytearray(COPY_CHUNK))
        buffer, fd, done = self._buffer, self._fd(r.path), 0
        while done < r.size:
            want = min(len(buffer), r.size - done)
            got = 0
            while got < want:
                n = os.preadv(fd, [buffer[got:want]], r.offset + done + got)
                if not n:
                    raise self._short(r, done + got)
                got += n
            yield buffer[:want]
            done += want

    def copy(self, r: _Range, out: io.RawIOBase, pos: int) -> None:
        """Write the range at ``pos`` of ``out``: in the kernel where it can, else through memory."""
        fd, done = self._fd(r.path), 0
        while self._kernel and done < r.size:
            try:
                n = kernel_copy(fd, out.fileno(), r.size - done, r.offset + done, pos + done)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self._kernel = False
                break
            if not n:
                raise self._short(r, done)
            done += n
        if done < r.size:
            out.seek(pos + done)
            for view in self.chunks(_Range(r.path, r.offset + done, r.size - done)):
                written = 0
                while written < len(view):
                    written += out.write(view[written:]) or 0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _digest_problem(path: Path, entry: dict) -> str | None:
    """What differs between ``path`` and its manifest ``entry`` (size already equal), or None; the file is
    read once."""
    want = entry["sha256"]
    try:
        have = file_sha256(path) if isinstance(want, str) and entry["size"] > PIECE_BYTES else file_digest(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if have == want:
        return None
    bad = [i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b] \
        if isinstance(have, list) and isinstance(want, list) and len(have) == len(want) else []
    if bad:
        return (f"sha256 differs from the manifest in {len(bad)} of {len(want)} pieces of {PIECE_BYTES >> 20} MiB "
                f"(first: piece {bad[0]}, from byte {bad[0] * PIECE_BYTES})")
    return "sha256 differs from the manifest"


def _digest_matches(path: Path, entry: dict) -> bool:
    """Whether ``path`` has the digest of its journal or manifest ``entry`` (one piece, pieces, or the whole-file
    sha256 a version-1 manifest recorded for a file larger than a piece)."""
    return _digest_problem(path, entry) is None


def _stage_of(path: Path) -> tuple[Stage, str] | None:
    path = Path(os.path.abspath(path))
    for parent in path.parents:
        stage = _ACTIVE.get(parent)
        if stage is not None:
            return stage, path.relative_to(parent).as_posix()
    return None


def create_file(path: str | Path) -> OutputFile:
    """Open ``path`` for writing; inside an active stage it is hashed and journaled when closed."""
    path = Path(path)
    found = _stage_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if found is None:
        return OutputFile(path, None, path.name)
    stage, rel = found
    share = stage.split.get(rel)
    return OutputFile(path, stage, rel, Part(*share) if share is not None else None)


def kept_state(path: str | Path) -> Any | None:
    """The journaled state of ``path`` if ``--resume`` kept it (checksum verified), else None.

    Writers call this before producing a file and skip the work when it returns something (files
    without state return ``{}``).
    """
    found = _stage_of(Path(path))
    if found is None:
        return None
    stage, rel = found
    entry = stage.kept.get(rel)
    if entry is None:
        return None
    return entry.get("state") or {}


def forget_kept(path: str | Path) -> None:
    """``--resume`` kept ``path`` but its journaled state does not hold up (the writer checked it): the
    file is written again (:func:`create_file` truncates it) and its old entry is dropped."""
    found = _stage_of(Path(path))
    if found is not None:
        stage, rel = found
        stage.kept.pop(rel, None)
        stage.entries.pop(rel, None)
        stage.notes.append(f"redone: the journaled state of '{rel}' did not match the plan")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a small file through :func:`create_file`."""
    with create_file(path) as f:
        f.write(data)


def copy_file(src: str | Path, dst: str | Path, within: str | Path | None = None) -> int:
    """Copy ``src`` to ``dst`` byte for byte through :func:`create_file`; skip it if ``--resume`` kept it.

    ``within``: the checkpoint folder ``src`` belongs to; a symlink leaving it is refused (:func:`check_inside`).
    The copy never gets wider permissions than ``src`` (a 0600 file stays 0600)."""
    if within is not None:
        check_inside(src, within)
    note_input(src)
    if kept_state(dst) is not None:
        return Path(dst).stat().st_size
    n = 0
    with open(src, "rb") as fin, create_file(dst) as fout:
        mode = os.fstat(fin.fileno()).st_mode & 0o777
        while block := fin.read(_HASH_BLOCK):
            fout.write(block)
            n += len(block)
    os.chmod(dst, os.stat(dst).st_mode & 0o777 & mode)
    return n


def link_file(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` as ``dst`` inside a stage (hashed by reading it once, since nothing is written)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)
    found = _stage_of(dst)
    if found is not None:
        stage, rel = found
        stage.journal(rel, dst.stat().st_size, file_digest(dst), None)


# ------------------------------------------------------------------------------------------ stage
class Stage(os.PathLike):
    """The staging folder of one run: ``stage / "name"`` is a path inside it; it keeps the journal."""

    def __init__(self, path: Path, dst: Path):
        self.path = path
        self.dst = dst
        self.journal_path = journal_path(dst)
        self.entries: dict[str, dict] = {}  # rel -> {"size", "sha256", "state"} of finished files
        self.kept: dict[str, dict] = {}  # entries kept from an earlier run by --resume
        self.rehashed: list[str] = []
        self.notes: list[str] = []
        self.active = True  # False once the run has left the stage: a late close (GC) journals nothing
        self.in_memory = False  # a torchrun follower: entries go to rank 0, not to the journal file
        self.split: dict[str, tuple[int, int | None]] = {}  # rel -> this rank's bytes of a file ranks share
        self.parts: dict[str, Part] = {}  # rel -> this rank's finished share of such a file
        self._journal: io.TextIOBase | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | Path) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)

    @property
    def kept_bytes(self) -> int:
        return sum(e["size"] for e in self.kept.values())

    def _append(self, record: dict) -> None:
        """Append one line, flushed to the kernel: it survives the process (a SIGKILL). It is not fsynced:
        on ext4 an fsync waits for every file's data in flight, stalling the run at each file, and a line
        lost to a power cut only means ``--resume`` redoes that file (kept files are re-hashed anyway)."""
        if self._journal is None:
            self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 - close_journal
        self._journal.write(json.dumps(record, sort_keys=True) + "\n")
        self._journal.flush()

    def journal(self, rel: str, size: int, sha256: Digest, state: Any) -> None:
        """Record a finished file (flushed, so a killed process still knows it; see :meth:`_append`);
        ``sha256`` is its :data:`~vlconvert.hashing.Digest`."""
        if not self.active:
            return
        entry = {"size": size, "sha256": sha256, "state": state}
        self.entries[rel] = entry
        if not self.in_memory:
            self._append({"file": rel, **entry})

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _read_journal(self) -> tuple[dict | None, dict[str, dict]]:
        """The run header and the finished files of an earlier run's journal (a cut-short line is ignored)."""
        header, files = None, {}
        try:
            lines = self.journal_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None, {}
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
                if number == 0:
                    header = record.get("run") if isinstance(record.get("run"), dict) else None
                    continue
                if not is_digest(record["sha256"]):
                    continue
                files[str(record["file"])] = {"size": int(record["size"]), "sha256": record["sha256"],
                                              "state": record.get("state")}
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return header, files

    def start(self, fingerprint: dict, resume: bool, info: Callable[[str], None]) -> None:
        """Create the staging folder, or clean / resume the one a dead run left."""
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as it reads back
        header, files = self._read_journal()
        who = f" (pid {header.get('pid')})" if header and header.get("pid") else ""
        if os.path.lexists(self.path):
            if resume:
                previous = header.get("fingerprint") if header else None
                if previous != fingerprint:
                    changed = _changed_input(previous, fingerprint)
                    if changed:
                        raise UserError(f"the input '{changed}' changed since the interrupted run wrote "
                                        f"'{self.path}': its finished files would mix old and new bytes; rerun "
                                        "without --resume to start over")
                    raise UserError(f"the staged output '{self.path}' was made by another command or other options: "
                                    "rerun without --resume to start over")
                self._resume(files, info, who)
                return
            finished = sum(1 for rel in files if (self.path / rel).is_file())
            if finished:  # finished work is never discarded silently: not even under -q or --json
                warn(f"discarding {finished} finished file{'' if finished == 1 else 's'} of an interrupted "
                     f"run{who} in '{self.path}' (--resume would keep them)")
            _remove(self.path)
            self.notes.append(f"discarded {finished} finished files of an interrupted run")
        elif resume:
            info(f"nothing to resume for '{self.dst}': starting from the beginning")
        _remove(self.journal_path)
        self._append({"run": {"pid": os.getpid(), "host": socket.gethostname(), "fingerprint": fingerprint}})
        self.path.mkdir()

    def _resume(self, journaled: dict[str, dict], info: Callable[[str], None], who: str) -> None:
        kept: dict[str, dict] = {}
        for path in sorted(self.path.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            rel = path.relative_to(self.path).as_posix()
            entry = journaled.get(rel)
            if entry is not None and not path.is_symlink() and path.stat().st_size == entry["size"] \
                    and _digest_matches(path, entry):
                kept[rel] = entry
            else:
                path.unlink()
        header = {"pid": os.getpid(), "host": socket.gethostname()}
        previous, _ = self._read_journal()
        _remove(self.journal_path)
        self._append({"run": {**header, "fingerprint": (previous or {}).get("fingerprint")}})
        for rel, entry in sorted(kept.items()):
            self._append({"file": rel, **entry})
        self.kept = kept
        self.entries = dict(kept)
        info(f"resuming the run{who} that wrote {self.path}: {len(kept)} finished files kept")
        self.notes.append(f"resumed: {len(kept)} file{'' if len(kept) == 1 else 's'} kept from the interrupted run")

    def finish(self) -> None:
        """Write the manifest last; every file in the stage must have been journaled."""
        self.close_journal()
        on_disk = {p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()}
        on_disk.discard(MANIFEST_NAME)
        missing = on_disk - set(self.entries)
        if missing:  # written without create_file: a bug in a writer, never silently unlisted
            raise RuntimeError(f"files written without the manifest: {sorted(missing)}")
        files = {rel: manifest_entry(e["size"], e["sha256"]) for rel, e in sorted(self.entries.items())
                 if rel in on_disk}
        sync_files([self.path / rel for rel in sorted(on_disk)])  # every rank's files, kept ones too
        manifest = {"format": "vlconvert-manifest", "version": 2, "piece_bytes": PIECE_BYTES, "files": files}
        path = self.path / MANIFEST_NAME
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise  # staged_output says "disk full"
            raise UserError(f"cannot write '{path}' to disk: {exc.strerror or exc}; nothing was published") from exc
        fsync_folder(self.path)


@contextlib.contextmanager
def attached_stage(path: str | Path, dst: str | Path, kept: dict[str, dict] | None = None) -> Iterator[Stage]:
    """Join the stage another process (rank 0 under torchrun) created and owns: files written here through
    :func:`create_file` are hashed into ``stage.entries``, which the caller hands to the owner. ``kept``: the
    files the owner's ``--resume`` kept (writers skip them, see :func:`kept_state`)."""
    stage = Stage(Path(path), Path(os.path.abspath(dst)))
    stage.in_memory = True
    stage.kept = dict(kept or {})
    _ACTIVE[stage.path] = stage
    try:
        yield stage
    finally:
        _ACTIVE.pop(stage.path, None)
        stage.active = False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def input_identities(paths: list[str | Path | None]) -> dict[str, list[int]]:
    """Size, mtime (ns), inode and device of every file under ``paths`` (files or folders; links to
    files followed): what ``--resume`` compares to know that the inputs are the bytes the interrupted
    run read (a rewritten shard of the same size has another mtime)."""
    found: dict[str, list[int]] = {}

    def add(path: Path) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if not os.path.isdir(path):
            found[str(path)] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]

    for given in paths:
        if given is None:
            continue
        root = Path(os.path.abspath(os.path.expanduser(str(given))))
        if not root.is_dir():
            add(root)
            continue
        seen: set[tuple[int, int]] = set()
        for folder, dirs, names in os.walk(root, followlinks=True):  # a linked rank folder is read too
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                dirs.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs.sort()
            for name in sorted(names):
                add(Path(folder) / name)
    return found


def _with_read_files(fingerprint: dict) -> dict:
    """``fingerprint`` whose ``inputs`` also hold the identity of every file the readers opened
    (:func:`read_inputs`), so ``--resume`` notices a changed input that no option names."""
    identities: dict[str, list[int]] = {}
    for path, _ in read_inputs():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not os.path.isdir(path):
            identities[str(path)] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    if not identities:
        return fingerprint
    return {**fingerprint, "inputs": {**identities, **(fingerprint.get("inputs") or {})}}


def _changed_input(previous: Any, now: dict) -> str | None:
    """The first input file whose identity differs between two fingerprints that differ only in their
    ``inputs`` (None when something else differs)."""
    if not isinstance(previous, dict) or not isinstance(previous.get("inputs"), dict):
        return None
    if {k: v for k, v in previous.items() if k != "inputs"} != {k: v for k, v in now.items() if k != "inputs"}:
        return None
    old, new = previous["inputs"], now.get("inputs") or {}
    for path in sorted(set(old) | set(new)):
        if old.get(path) != new.get(path):
            return path
    return None


PUBLISHED: list[Path] = []  # outputs published by this command so far (what an interrupt message says)
WARNINGS: list[str] = []  # warnings said by this command so far (a --json record carries them)


def warn(message: str) -> None:
    """Say ``message`` on stderr as ``warning: ...`` whatever -q or --json, and keep it in :data:`WARNINGS`:
    for what a user must hear even from a quiet run (finished work discarded)."""
    WARNINGS.append(message)
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def staging_path(dst: Path) -> Path:
    """Where the output for ``dst`` is written before it is published."""
    return dst.parent / f".{dst.name}.vlconvert-partial"


def journal_path(dst: Path) -> Path:
    """The journal of the run writing ``dst``: its options, then every finished file with its sha256."""
    return dst.parent / f".{dst.name}.vlconvert-journal"


@contextlib.contextmanager
def staged_output(dst: str | Path, *, inputs: dict[str, str | Path | None] | None = None, overwrite: bool = False,
                  resume: bool = False, needed_bytes: int = 0, fingerprint: dict | None = None,
                  info: Callable[[str], None] = lambda s: None) -> Iterator[Stage]:
    """Yield a :class:`Stage` for ``dst``; publish it as ``dst`` only if the block succeeds.

    ``inputs`` are the folders the run reads (checked for overlap); ``fingerprint`` (the command and
    its options) must match for ``--resume`` to reuse an earlier run's files.
    """
    dst = Path(os.path.abspath(os.path.expanduser(str(dst))))
    if dst.name in ("", ".", ".."):
        raise UserError(f"output '{dst}' is not a folder name: choose another output folder")
    inputs = inputs or {}
    check_no_overlap(dst, inputs, read=read_inputs())
    if os.path.lexists(dst) and not overwrite and not empty_folder(dst):
        what = "is a symlink to a missing path" if dst.is_symlink() and not dst.exists() else "already exists"
        raise UserError(f"output '{dst}' {what}: choose another path or pass --overwrite")
    created = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output's parent folder '{dst.parent}': {exc.strerror}") from exc
    lock = _Lock(dst.parent / f".{dst.name}.vlconvert-lock", dst)
    stage = Stage(staging_path(dst), dst)
    published = owned = keep = False
    try:
        checked = _identity(dst)  # under the lock: what --overwrite may replace
        empty = checked is not None and empty_folder(dst)  # mkdir'd beforehand: replaced as if absent
        if checked is not None and not overwrite and not empty:
            raise UserError(f"output '{dst}' already exists: choose another path or pass --overwrite")
        stage.start(_with_read_files(fingerprint or {}), resume, info)
        owned = True
        check_free_space(dst.parent, max(0, needed_bytes - stage.kept_bytes))
        _ACTIVE[stage.path] = stage
        try:
            yield stage
        finally:
            _ACTIVE.pop(stage.path, None)
            stage.active = False
            stage.close_journal()
        stage.finish()
        check_no_overlap(dst, inputs, read=read_inputs())  # again: files the readers opened while writing
        with _signals_deferred():  # an interrupt lands before the rename or after ``published`` is set
            _publish(stage, dst, checked, empty)
            published = True
            PUBLISHED.append(dst)
        fsync_folder(dst.parent, f"'{dst}' was published but its name may not survive a power cut")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing '{dst}': nothing was published; free space and rerun") from exc
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (errors.Terminated): finished files stay for --resume
        finished = len(stage.entries)
        if published:
            exc.outcome = f"'{dst}' was published (complete) before the interrupt"  # type: ignore[attr-defined]
        elif owned and finished:
            keep = True
            exc.outcome = (f"nothing was published; rerun with --resume to keep {finished} "  # type: ignore[attr-defined]
                           "finished files")
        raise
    finally:
        if owned and not published and not keep:
            _remove(stage.path)
            _remove(stage.journal_path)
        lock.release()
        if not published:
            for folder in created:  # parents this run made, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done: publishing is never cut between its renames, and
    the flag saying it happened is set before the interrupt is raised (by the handler that was in place).
    Python runs signal handlers in the main thread only, so they are swapped there (elsewhere: no-op)."""
    import signal

    pending: list[int] = []
    old: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            handler = old.get(pending[0])
            if callable(handler):
                handler(pending[0], None)  # raises KeyboardInterrupt / errors.Terminated
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def empty_folder(path: Path) -> bool:
    """Whether ``path`` is a real (not linked) folder holding nothing: an output folder made beforehand."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _publish(stage: Stage, dst: Path, checked: tuple[int, int, int] | None, empty: bool) -> None:
    """Rename the finished stage to ``dst`` if ``dst`` is as it was checked at the start. An empty folder
    found at the start is replaced by the rename itself, which fails if anything appeared in it."""
    now = _identity(dst)
    if now != checked:
        raise UserError(f"'{dst}' was created or replaced by something else while this run was writing it: "
                        "nothing was published; check it and rerun")
    if empty:
        try:
            os.rename(stage.path, dst)  # replaces an empty folder in one step; ENOTEMPTY if it is not
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise UserError(f"'{dst}' was empty at the start but files appeared in it while this run was writing: "
                            "nothing was published; check it and rerun") from exc
    elif checked is None:
        try:
            _rename_noreplace(stage.path, dst)
        except FileExistsError as exc:
            raise UserError(f"'{dst}' appeared while this run was writing it: nothing was published") from exc
    else:
        old = dst.parent / f".{dst.name}.vlconvert-old"
        _remove(old)
        os.rename(dst, old)
        os.rename(stage.path, dst)
        _remove(old)
    _remove(stage.journal_path)


# --------------------------------------------------------------------------------------- manifest
def manifest_entry(size: int, digest: Digest) -> dict:
    """A file's manifest entry: ``{"size", "sha256"}`` for a file of one piece (its ``sha256sum``), ``{"size",
    "sha256_pieces"}`` for a larger one (the sha256 of each ``piece_bytes`` piece, in order)."""
    return {"size": size, "sha256_pieces" if isinstance(digest, list) else "sha256": digest}


def _entry_digest(entry: Any) -> Digest | None:
    """The digest a manifest entry holds, as :func:`manifest_entry` wrote it (None if malformed)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry["size"], bool):
        return None
    pieces = entry.get("sha256_pieces")
    if pieces is not None:
        ok = isinstance(pieces, list) and len(pieces) == pieces_of(entry["size"]) > 1 and all(
            isinstance(p, str) for p in pieces)
        return pieces if ok else None
    return entry["sha256"] if isinstance(entry.get("sha256"), str) else None


def read_manifest(folder: str | Path) -> dict[str, dict]:
    """The files of ``folder``'s manifest, validated, as ``{name: {"size", "sha256": digest}}``.

    Version 2 holds pieces for files larger than ``piece_bytes``; version 1 (the first vlconvert 0.2) the
    sha256 of the whole file, which is still checked as such."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"'{folder}' has no {MANIFEST_NAME}: it was not written by vlconvert 0.2 or later")
    data = _read_json(path)
    if not isinstance(data, dict):
        data = {"files": None}
    raw, version = data.get("files"), data.get("version", 1)
    if version not in (1, 2) or (version == 2 and data.get("piece_bytes") != PIECE_BYTES):
        raise UserError(f"'{path}' is a manifest this vlconvert cannot check (version {version!r}, pieces of "
                        f"{data.get('piece_bytes')!r} bytes): use the vlconvert that wrote it")
    files = {k: {"size": v["size"], "sha256": d} for k, v in raw.items()
             if isinstance(k, str) and (d := _entry_digest(v)) is not None} if isinstance(raw, dict) else None
    if files is None or len(files) != len(raw):
        raise UserError(f"'{path}' is corrupt: expected {{'files': {{name: {{size, sha256 or sha256_pieces}}}}}}")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UserError(f"'{path}' names '{rel}', outside the folder")
    return files


def check_manifest(folder: str | Path, progress: Callable[[int], None] = lambda n: None) -> list[tuple[str, str]]:
    """Compare every file of ``folder`` with its manifest; return ``(file, problem)`` for each mismatch."""
    folder = Path(folder)
    files = read_manifest(folder)
    problems: list[tuple[str, str]] = []
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            problems.append((rel, "missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append((rel, f"size {size}, manifest says {entry['size']}"))
            continue
        problem = _digest_problem(path, entry)
        if problem:
            problems.append((rel, problem))
        progress(size)
    listed = set(files) | {MANIFEST_NAME}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in listed:
            problems.append((rel, "not in the manifest"))
    return problems
