"""The processes that write one conversion together: the ranks of ``torchrun``, or ``--workers N`` processes
forked by one command. Both split the output's bytes the same way (:mod:`vlconvert.splitting`) and meet through
the small :class:`Group` interface, so the engine has one path for either.

Why fork workers when ``torchrun`` exists: on a many-core node one process moves the bytes at the rate of one
write stream (measured on a 16-core NVMe machine: ``cp -r`` 1.37 GB/s, the same bytes as 8 byte ranges at once
2.19 GB/s), and every ``torchrun`` rank, and the launcher itself, pays ``import torch`` (3.5-4 s with the CUDA
build). Workers forked after the plan pay it once and start writing at once.

Forking is safe here because it happens before the run starts any thread (the hashing pool, the progress bar,
torch's intra-op pool on large tensors) and each child reopens the source: a file handle shared across a fork
shares its offset."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import signal
import struct
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import Any, NoReturn, Protocol

from vlconvert.errors import UsageError, UserError

MAX_AUTO_WORKERS = 8
BYTES_PER_WORKER = 2**30  # auto: one worker per GiB of output, so a small conversion stays in one process


class Group(Protocol):
    """The processes writing one output: ``rank`` 0 creates the stage, journals and publishes."""

    rank: int
    world: int
    noun: str  # how messages name a process: "rank" (torchrun) or "worker"

    def all_gather(self, value: Any) -> list:
        """Every process's ``value``, in rank order, returned to every process. Values are ``(error, payload)``
        pairs (error None when all went well): a worker that died is given ``(its one line, None)``, so every
        process sees the failure at the same exchange."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, returned to every process (the others pass None)."""

    def stop_others(self) -> None:
        """Rank 0, failing: end the other processes before the stage is removed (workers only)."""

    def progress(self, bar: Callable[[int], None], total: int) -> Callable[[int], None]:
        """This process's ``advance(n)`` for the bar ``bar`` of ``total`` bytes (a no-op bar where it has none)."""

    def shown(self) -> range:
        """The ranks whose bytes this process's bar counts."""


class TorchGroup:
    """The ranks of ``torchrun``, through ``torch.distributed`` (gloo)."""

    noun = "rank"

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_gather(self, value: Any) -> list:
        out: list = [None] * self.world
        self._dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop_others(self) -> None:
        """The ranks are torchrun's: they stop at the next exchange, which tells them rank 0 failed."""

    def progress(self, bar: Callable[[int], None], total: int) -> Callable[[int], None]:
        return bar

    def shown(self) -> range:
        return range(self.rank, self.rank + 1)


class ForkedGroup:
    """``--workers N``: rank 0 is the command's own process, ranks 1..N-1 children forked from it after the
    plan. Rank 0 relays every exchange through one pipe per child (pickled values, as ``torch.distributed``'s
    object collectives do). A child that dies is seen as the end of its pipe (one line, no hang); a child whose
    parent dies gets SIGTERM (``PR_SET_PDEATHSIG``). Progress: each child adds the bytes it wrote to its slot of
    a shared page, which rank 0's bar takes in (:meth:`progress`), also while it waits at an exchange."""

    noun = "worker"

    def __init__(self, world: int) -> None:
        self.rank, self.world = 0, world
        self._counts = mmap.mmap(-1, 8 * world)
        self._seen = [0] * world
        self._pipes: list[Connection] = []
        self._pids: list[int] = []
        self._bar: Callable[[int], None] = lambda n: None
        self._gone: dict[int, tuple[str, None]] = {}  # rank 0: workers that died, and their line
        self.of = ""  # under torchrun: " of rank R", for messages
        ends = [Pipe() for _ in range(1, world)]
        sys.stdout.flush()
        sys.stderr.flush()
        for rank in range(1, world):
            try:
                pid = os.fork()
            except OSError as exc:  # EAGAIN / ENOMEM: a process limit or memory, not a bug
                self.stop_others()
                raise UserError(f"could not start worker {rank} of {world} ({exc.strerror}): give fewer --workers"
                                ) from None
            if pid == 0:
                self.rank = rank
                for i, (near, far) in enumerate(ends, start=1):
                    near.close()
                    if i != rank:
                        far.close()
                self._pipes = [ends[rank - 1][1]]
                _die_with_parent()
                return
            self._pids.append(pid)
        for near, far in ends:
            far.close()
            self._pipes.append(near)

    # ---------------------------------------------------------------------------------- exchanges
    def all_gather(self, value: Any, combine: Callable[[list], list] = lambda values: values) -> list:
        """Every worker's ``value`` in order; ``combine`` (rank 0 only) turns them into what all receive."""
        if self.rank != 0:
            self._send(self._pipes[0], value)
            return self._recv(self._pipes[0], 0)
        out = combine([value, *(self._recv(pipe, rank) for rank, pipe in enumerate(self._pipes, start=1))])
        for pipe in self._pipes:
            self._send(pipe, out)
        return out

    def broadcast(self, value: Any) -> Any:
        if self.rank != 0:
            return self._recv(self._pipes[0], 0)
        for pipe in self._pipes:
            self._send(pipe, value)
        return value

    def _send(self, pipe: Connection, value: Any) -> None:
        try:
            pipe.send(value)
        except OSError:  # the other end is gone: the receive that follows reports who
            pass

    def _recv(self, pipe: Connection, rank: int) -> Any:
        """The next value from ``pipe`` (rank ``rank``'s). Its end: in a child, rank 0 is gone (it reports why),
        so the child ends; in rank 0, worker ``rank`` died: ``(its one line, None)``, that exchange's error."""
        if rank in self._gone:
            return self._gone[rank]
        while not pipe.poll(0.2):
            self._take_progress()
        try:
            value = pipe.recv()
            self._take_progress()  # a child counts its bytes before it sends
            return value
        except (EOFError, OSError):
            if self.rank != 0:
                os._exit(1)
            line = f"worker {rank}{self.of} stopped before finishing its share ({self._end_of(rank)})"
            self._gone[rank] = (line, None)
            return self._gone[rank]

    def _end_of(self, rank: int) -> str:
        try:
            pid, status = os.waitpid(self._pids[rank - 1], 0)
        except ChildProcessError:
            return "reaped"
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit code {os.waitstatus_to_exitcode(status)}"

    # ------------------------------------------------------------------------------------ progress
    def shown(self) -> range:
        return range(self.world)

    def progress(self, bar: Callable[[int], None], total: int) -> Callable[[int], None]:
        """This process's ``advance(n)``: rank 0's moves ``bar`` by its own bytes and the children's, up to
        ``total`` (a record two workers' shares cut is built by both: the second drops the part before its
        share, but counted it); a child's records its bytes for rank 0 to take in."""
        if self.rank == 0:
            left = [total]

            def moved(n: int) -> None:
                n = min(n, left[0])
                left[0] -= n
                bar(n)
            self._bar = moved

            def advance(n: int) -> None:
                moved(n)
                self._take_progress()
            return advance
        slot = 8 * self.rank

        def record(n: int) -> None:
            struct.pack_into("<q", self._counts, slot, struct.unpack_from("<q", self._counts, slot)[0] + n)
        return record

    def _take_progress(self) -> None:
        if self.rank != 0:
            return
        for rank in range(1, self.world):
            done = struct.unpack_from("<q", self._counts, 8 * rank)[0]
            if done > self._seen[rank]:
                self._bar(done - self._seen[rank])
                self._seen[rank] = done

    # -------------------------------------------------------------------------------------- ending
    def child_exit(self, body: Callable[[], Any]) -> NoReturn:
        """A child: run ``body`` (its share and the exchanges), then end without returning to the caller
        (the command's summary and the stage belong to rank 0). Errors have been reported through the
        exchanges; Ctrl-C reaches every process of the group, and rank 0 reports it."""
        code = 0
        try:
            body()
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - rank 0 tells the user; a child prints nothing
            code = 1
        os._exit(code)

    def stop_others(self) -> None:
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reap()

    def reap(self) -> None:
        """Rank 0: wait for every child to end (they end right after the last exchange)."""
        for pid in self._pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._pids = []
        for pipe in self._pipes:
            pipe.close()


class NodeGroup:
    """``torchrun`` with ``--workers W``: each rank forks W-1 workers (before it joins the process group, so no
    gloo thread is running at the fork), making ``WORLD_SIZE * W`` processes; process ``r * W + i`` is worker
    ``i`` of rank ``r``. A rank relays its workers' values to the other ranks (one ``torch.distributed`` call per
    exchange, among the ranks only), so one rank per node with W workers splits a file over every node's cores
    without each process paying ``import torch`` and the rendezvous."""

    noun = "process"

    def __init__(self, node: ForkedGroup, rank: int, ranks: int) -> None:
        self.node, self._ranks = node, None
        node.of = f" of rank {rank}"
        self.rank, self.world = rank * node.world + node.rank, ranks * node.world
        self._first = rank * node.world

    def join(self) -> None:
        """The rank's own process: join the ranks (after the fork)."""
        self._ranks = TorchGroup()

    def all_gather(self, value: Any) -> list:
        def across(local: list) -> list:
            return [v for values in self._ranks.all_gather(local) for v in values]
        return self.node.all_gather(value, across)

    def broadcast(self, value: Any) -> Any:
        if self.node.rank == 0:
            value = self._ranks.broadcast(value)
        return self.node.broadcast(value)

    def stop_others(self) -> None:
        self.node.stop_others()

    def progress(self, bar: Callable[[int], None], total: int) -> Callable[[int], None]:
        return self.node.progress(bar, total)

    def shown(self) -> range:
        return range(self._first, self._first + self.node.world)


def _die_with_parent() -> None:
    """Linux: SIGTERM this child if the command's process dies (SIGKILL, OOM killer) before it reaps us."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers(output_bytes: int) -> int:
    """``--workers auto``: one process per GiB of output, at most :data:`MAX_AUTO_WORKERS` and half the cores
    this process may use, but two where there are two or three cores (on a 2-core VM two workers took 8.3 s
    where one took 11.4, hf->dcp of the 2B, mean of 3 pairs)."""
    cores = usable_cores()
    return max(1, min(MAX_AUTO_WORKERS, max(min(cores, 2), cores // 2), math.ceil(output_bytes / BYTES_PER_WORKER)))


def parse_workers(value: str | int | None) -> int | None:
    """``--workers``: a count of at least 1, or ``auto`` / None (decided from the plan: :func:`auto_workers`)."""
    if value is None or value == "auto":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(value).strip() != str(count):
        raise UsageError(f"--workers {value!r} is not a count: give 1 or more, or 'auto'")
    limit = max(8, 4 * usable_cores())
    if count > limit:
        raise UsageError(f"--workers {count} is more than {limit} (4 per core on this machine's {usable_cores()}): "
                         "each worker is a process; give fewer, or 'auto'")
    return count
