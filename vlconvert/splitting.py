"""Ranks of ``torchrun`` that write byte ranges of the same output file (issue 21: split the bytes, not only
the files).

Every rank plans the same output, so every writer knows every offset before it writes: a rank walks the
whole file (producing only the tensors its bytes hold) and writes its share, ``start:stop``
(:class:`~vlconvert.publish.Part`).
What a share cannot finish alone, and how it is finished once the ranks meet:

- **sha256**: the manifest hashes 64 MiB pieces (:mod:`vlconvert.hashing`), which are independent: the pieces
  wholly inside a share are hashed while written; a piece that two shares write (a share boundary that is
  not a piece boundary, or one smaller than a piece) is read back and hashed, after every rank has written,
  by the rank whose share holds its first byte. Shares of large files start on piece boundaries
  (:func:`assign_shares`), so only the pieces under a late byte (below) are read back there.
- **CRC-32** of a zip record (torch.save archives in DCP and Megatron files) that crosses a boundary: each
  rank computes the CRC of the part it saw; the ranks exchange them (small: a few numbers per record) and
  combine them with :func:`~vlconvert.hashing.crc32_combine`, zlib's algorithm. Handing the running CRC state
  from rank to rank would serialise the ranks; combining lets them all run at once.
- **Late bytes** that hold such CRCs (a record's data descriptor, the archive's central directory) are
  written as zeros first (a hole) and filled in once the CRCs are combined; the pieces under them are
  then hashed from the file.

Rank 0 then journals each split file whole (its size, the pieces' digests in order, the writer's state),
exactly as one process would have: the output and its manifest are byte-identical whatever the ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlconvert.errors import UserError
from vlconvert.hashing import PIECE_BYTES, Digest, piece_digests, pieces_of
from vlconvert.publish import Part

SPLIT_BYTES_ENV = "VLCONVERT_SPLIT_BYTES"  # the smallest share of a file (tests set it to a few KiB)

Share = tuple[int, int, "int | None"]  # rank, first byte, end (None: to the end of the file)


def split_bytes() -> int:
    """The smallest share of one file a rank writes: a piece (64 MiB), or ``$VLCONVERT_SPLIT_BYTES``."""
    value = os.environ.get(SPLIT_BYTES_ENV, "")
    try:
        return max(1, int(value)) if value else PIECE_BYTES
    except ValueError:
        raise UserError(f"{SPLIT_BYTES_ENV}={value!r} is not a number of bytes") from None


def assign_shares(files: Sequence[Any], world: int, unit: int | None = None) -> dict[str, list[Share]]:
    """Who writes which bytes of each output file: ``name -> [(rank, start, stop), ...]``, in file order.

    The files are laid end to end (sizes from the plan's tensor bytes) and cut into ``world`` runs of about
    equal bytes; a cut that falls within an eighth of a run of a file boundary moves to it (the file stays
    whole), any other cuts the file at a multiple of ``unit`` (default :func:`split_bytes`), or moves to the
    file's end where no such multiple lies inside it (so rank 0 always writes the start of the first file,
    which a target's lead may need: torch_dist's ``.metadata`` comes from walking its data file). A file whose
    list has one share is written whole by that rank, as without splitting. Deterministic: every rank
    computes the same."""
    unit = unit or split_bytes()
    total = sum(f.nbytes for f in files)
    if world <= 1 or not total:
        return {f.name: [(0, 0, None)] for f in files}
    run = total / world
    starts, offset = [], 0
    for f in files:
        starts.append(offset)
        offset += f.nbytes
    cuts: list[int] = []  # where rank r + 1 starts, in the files laid end to end
    for r in range(1, world):
        at = run * r
        i = max(j for j, s in enumerate(starts) if s <= at)
        within, size = at - starts[i], files[i].nbytes
        cut = round(within / unit) * unit
        if within <= run / 8:
            cut = 0
        elif size - within <= run / 8 or not 0 < cut < size:
            cut = size  # never 0 here: rank 0 always writes the start of the first file
        cuts.append(max(starts[i] + cut, cuts[-1] if cuts else 0))
    bounds = [0, *cuts, total]
    shares: dict[str, list[Share]] = {}
    for f, start in zip(files, starts, strict=True):
        owners: list[Share] = []
        for rank in range(world):
            lo, hi = max(bounds[rank], start), min(bounds[rank + 1], start + f.nbytes)
            if lo < hi:
                owners.append((rank, lo - start, hi - start))
        if not owners:  # a file of no bytes: the rank whose run holds its place
            owners = [(max(r for r in range(world) if bounds[r] <= start), 0, None)]
        shares[f.name] = [*owners[:-1], (owners[-1][0], owners[-1][1], None)]  # the last runs to the real end
    return shares


def crc_report(parts: dict[str, Part]) -> dict[str, list[tuple[int, int, int, int, int]]]:
    """What this rank saw of every streamed record of its shares: ``rel -> [(record start, record size, first
    byte seen within it, bytes seen, their CRC-32), ...]`` (plain data, for the other ranks)."""
    return {rel: [(c.record[0], c.record[1], c.seen_from, c.length, c.local()) for c in part.records
                  if c.record is not None and c.length]
            for rel, part in parts.items()}


def combine_crcs(reports: Sequence[dict[str, list[tuple[int, int, int, int, int]]]]) -> dict[str, dict[int, int]]:
    """Every record's CRC-32, ``rel -> record start -> CRC``, from the ranks' :func:`crc_report`\\ s; a record
    whose parts do not cover it exactly is an error (a bug, never a wrong checksum)."""
    from vlconvert.hashing import crc32_combine

    seen: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {}
    for report in reports:
        for rel, records in report.items():
            for start, size, first, length, crc in records:
                seen.setdefault(rel, {}).setdefault(start, []).append((first, length, crc, size))
    out: dict[str, dict[int, int]] = {}
    for rel, records in seen.items():
        for start, parts in records.items():
            value, at = 0, 0
            for first, length, crc, _ in sorted(parts):
                if first != at:
                    raise RuntimeError(f"{rel}: the ranks' parts of the record at byte {start} leave a gap at {at}")
                value, at = crc32_combine(value, crc, length), at + length
            if at != parts[0][3]:
                raise RuntimeError(f"{rel}: the ranks' parts of the record at byte {start} cover {at} of "
                                   f"{parts[0][3]} bytes")
            out.setdefault(rel, {})[start] = value
    return out


def fill_holes(stage: Path, parts: dict[str, Part], crcs: dict[str, dict[int, int]]) -> None:
    """Give every record checksum of this rank's shares its combined value, then write the late bytes that
    waited for them (their part in this share) and sync the files."""
    for rel, part in parts.items():
        known = crcs.get(rel, {})
        for c in part.records:
            assert c.record is not None
            if c.record[1] == 0:  # an empty record: no rank saw a byte of it
                c.resolve(0)
                continue
            if c.record[0] not in known:
                raise RuntimeError(f"{rel}: no rank reported the record at byte {c.record[0]}")
            c.resolve(known[c.record[0]])
        if not part.holes:
            continue
        fd = os.open(stage / rel, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for make, pos, lo, hi in part.holes:
                data = memoryview(make()).cast("B")[lo - pos:hi - pos]
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], lo + done)
            os.fdatasync(fd)
        finally:
            os.close(fd)


def finish_pieces(stage: Path, parts: dict[str, Part]) -> dict[str, dict]:
    """This rank's digests of the pieces of its shares (the streamed ones, and those read back now: a piece
    other ranks wrote part of, or one under a hole), once every rank has filled its holes: ``rel -> {"size",
    "pieces": {index: digest}, "state"}``."""
    out: dict[str, dict] = {}
    for rel, part in parts.items():
        end = part.size if part.stop is None else min(part.stop, part.size)
        mine = range(-(-part.start // PIECE_BYTES), -(-end // PIECE_BYTES))  # pieces starting in the share
        missing = [i for i in mine if i not in part.hashed]
        pieces = {i: d for i, d in part.hashed.items() if i in mine}
        pieces.update(piece_digests(stage / rel, missing, part.size))
        out[rel] = {"size": part.size, "pieces": pieces, "state": part.state}
    return out


def assemble(reports: Sequence[dict[str, dict]]) -> dict[str, tuple[int, Digest, Any]]:
    """Each split file's size, :data:`~vlconvert.hashing.Digest` and writer state from every rank's
    :func:`finish_pieces` (rank order: the state of the rank holding byte 0 is taken)."""
    files: dict[str, tuple[int, dict[int, str], Any]] = {}
    for report in reports:
        for rel, got in report.items():
            size, pieces, state = files.get(rel, (got["size"], {}, got["state"]))
            if got["size"] != size:
                raise RuntimeError(f"{rel}: the ranks disagree on its size ({size} and {got['size']} bytes)")
            pieces.update({int(i): d for i, d in got["pieces"].items()})
            files[rel] = (size, pieces, state)
    out: dict[str, tuple[int, Digest, Any]] = {}
    for rel, (size, pieces, state) in files.items():
        count = pieces_of(size)
        if sorted(pieces) != list(range(count)):
            raise RuntimeError(f"{rel}: hashed pieces {sorted(pieces)} of {count}")
        ordered = [pieces[i] for i in range(count)]
        out[rel] = (size, ordered[0] if count == 1 else ordered, state)
    return out
