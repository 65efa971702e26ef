"""Moves chunks from the source into the sink: a reader thread fills pooled buffers while this
thread writes them and journals each, in order, once its write is done.

Three things keep the bytes' trips through memory few (docs/design.md, "Speed"):

- A chunk whose bytes lie verbatim in a source file (``Source.raw_range``) and whose sink
  stores parts of chunks (``Capabilities.piecewise``) is read by the reader thread a cache-sized
  step at a time, each step's source checksum and sink receipt checksum computed while it is
  still in the CPU's cache, and handed to this thread, which writes it (on two cores: on a
  busy machine each thread gets its share of a core). Where its tensor starts on a page of
  the sink's file, the chunk lies in memory at the page offset it has in its file
  (``Sink.page_offset``) and is written in one piece, whose page-aligned middle a file sink
  writes past the page cache: no copy into the cache and no writeback for the final fsync to
  wait on. Elsewhere it goes through the page cache a 1 MiB piece at a time.
- Any other chunk is filled into a pooled buffer by the reader thread, which also computes
  the sink's receipt checksum there, beside the writer rather than in its way.
- A sink's write may return a pending receipt (``result()``): up to all but two of the pool's
  buffers stay in flight, untouched until their write completes.

Every ``MARK_BYTES`` written, a sink that can ``sync`` is made durable and the journal gets a
durable mark, so a resume keeps the chunks before it without reading them again. The sync
runs on its own thread while copying goes on; the mark follows once it is done.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..progress import ProgressArg
from ..progress import start as start_progress
from ..util.checksums import BY_NAME
from ..util.fileio import pread_exact
from ..util.uncached import ALIGN
from .budget import Budget, BufferPool
from .integrity import IntegrityTracker
from .journal import Journal
from .plan import Chunk, Copy, Plan
from .types import RawRange, Segment

if TYPE_CHECKING:  # the contract only; core never imports a sink at run time
    from ..sinks.base import Sink

#: Bytes written at a time on the direct path: more than any chunk widened to whole pages
#: (``budget.MAX_CHUNK`` and two pages), so a chunk goes in one write, and the pool's buffers
#: overlap reading one chunk with writing another. A file sink writes its page-aligned middle
#: past the page cache (``util.uncached``) from a buffer of huge pages: the device gets it in
#: requests of 4 MiB, four at once (4 GiB cold: 4.3-4.9 s against 5.7-6.5 s for ``cp`` and
#: ``sync``; 4 MiB pieces took 6.4-9.4 s: bench/README.md, "Writing past the page cache").
PIECE = 32 << 20
#: The same for a chunk the sink writes through the page cache (``Sink.page_offset`` None): 1 MiB
#: took the least CPU of 128 KiB..4 MiB (bench/README.md "Copy paths"; 4 MiB doubled the system
#: time).
BUFFERED_PIECE = 1 << 20
#: Bytes read and checksummed at a time within a piece: the read's bytes are still in the CPU's
#: cache when they are checksummed.
READ_STEP = 1 << 20
#: Bytes written between durable marks. Only a resume after the machine restarted needs them
#: (on the same boot every journaled chunk is kept unread), and each sync slows the copy
#: (measured: 4 GiB cold with a sync per 256 MiB took 15-22 s instead of 11-12 s), so they are
#: rare: a restart costs re-reading at most this much. SHARDCONV_TEST_MARK_BYTES sets it for tests.
MARK_BYTES = int(os.environ.get("SHARDCONV_TEST_MARK_BYTES") or 4 << 30)
#: Test hook: SHARDCONV_TEST_KILL=chunk:K | journal:K | mark:K (the K-th durable mark) | lock | finish | renamed kills the
#: process with SIGKILL at that point, for the resume tests; after:SECONDS kills it that
#: long after the conversion starts, wherever it then is. race:POINT (lock | finish) instead
#: moves ``DEST.race`` to DEST at that point: another writer publishing DEST in that instant.
_KILL = os.environ.get("SHARDCONV_TEST_KILL", "")


def hook(point: str, dest: Path | None = None) -> None:
    """The test hook above, at ``point`` (a no-op unless SHARDCONV_TEST_KILL is set)."""
    if not _KILL:
        return
    if _KILL == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif _KILL == f"race:{point}" and dest is not None:
        os.rename(f"{dest}.race", dest)


def start_kill_timer() -> None:
    """The ``after:SECONDS`` test hook."""
    if _KILL.startswith("after:"):
        t = threading.Timer(float(_KILL[6:]), os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()


#: Pieces of one direct chunk read ahead of the writer (each a slice of the chunk's buffer).
SLOTS = 4


class _Pieces:
    """A direct chunk's pieces, passed from the reader (which reads and checksums each) to the
    writer (which writes it) through ``SLOTS`` slices of the chunk's buffer: ``ready`` carries
    (slot, length) in order, then None, or the reader's exception; ``free`` returns slots.

    The pieces cover the chunk widened to whole pages of its file where its tensor goes on
    (``back`` bytes before it, ``fwd`` after: bytes of the neighbouring chunks, the same on
    both sides, written again), so a file sink writes all of it past the page cache; a page
    it cannot widen to (a tensor's first or last) comes out as the piece's edge, which goes
    through the page cache."""

    def __init__(self, buf: memoryview, length: int, skew: int | None = 0, back: int = 0, fwd: int = 0) -> None:
        self.back, self.length, self.span = back, length, back + length + fwd
        # Pieces of equal size (in whole pages), none much smaller than PIECE: a short last
        # piece would go through the page cache (``util.uncached.MIN_BYTES``).
        most = PIECE if skew is not None else min(PIECE, BUFFERED_PIECE)
        skew = skew or 0
        count = -(-self.span // most)
        even = -(-self.span // count)
        self.piece = piece = min(self.span, -(-even // ALIGN) * ALIGN)
        # Each slot starts as far into a page as its piece does in its file (the buffer
        # starts on a page), so that the piece's page-aligned middle can go past the cache.
        skew = (skew - back) % ALIGN
        stride = -(-(piece + skew) // ALIGN) * ALIGN
        if len(buf) < skew + piece:
            skew, stride = 0, piece
        n = max(1, min(SLOTS, (len(buf) - skew) // stride))
        self.slots = [buf[k * stride + skew:k * stride + skew + piece] for k in range(n)]
        self.ready: queue.SimpleQueue[tuple[int, int] | BaseException | None] = queue.SimpleQueue()
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(n):
            self.free.put(k)
        self.receipt = 0
        self.segs: list[Segment] = []


@dataclass
class _Item:
    """A chunk on its way: its buffer (also the budget's token for a direct copy), what the
    reader read (segments, the receipt checksum) or where to copy it from."""

    i: int
    chunk: Chunk
    buf: memoryview
    segs: list[Segment] = field(default_factory=list)
    crc: int | None = None
    pieces: _Pieces | None = None
    receipt: Any = None


def run(plan: Plan, sink: Sink, journal: Journal, tracker: IntegrityTracker, todo: list[tuple[int, Chunk]],
        done: dict[int, dict[str, Any]], budget: Budget, progress: ProgressArg, total: int, initial: int,
        label: str, durable: bool = False) -> None:
    """Write every chunk of ``todo`` and journal it; ``done`` gains each journaled record.

    ``durable``: sync the sink and journal a durable mark every ``MARK_BYTES``.
    Raises: whatever the source, the sink or the journal raise (the reader's errors too)."""
    pool = BufferPool(budget.n_buffers, budget.buffer_bytes)
    filled: queue.Queue[_Item | BaseException | None] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=_reader, args=(plan, sink, todo, pool, filled, stop),
                              name="shardconv-reader", daemon=True)
    bar = start_progress(progress, total, initial, label)
    writer = _Writer(plan, sink, journal, tracker, done, pool, bar, budget.n_buffers - 2, durable)
    thread.start()
    try:
        while True:
            writer.settle(block=False)
            item = filled.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            writer.write(item)
        writer.settle(block=True, keep=0)
        writer.poll_sync(wait=True)
    finally:
        writer.stop_sync()
        stop.set()
        thread.join()
        if bar is not None:
            bar.close()


def _until_stopped(get: Callable[..., Any], stop: threading.Event) -> Any:
    """``get(timeout=...)`` of a queue, retried until it gives something; None once the writer
    has stopped (the reader must not wait for a buffer or a slot that will never come back)."""
    while not stop.is_set():
        try:
            return get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def _reader(plan: Plan, sink: Sink, todo: list[tuple[int, Chunk]], pool: BufferPool,
            filled: queue.Queue, stop: threading.Event) -> None:
    piecewise = sink.capabilities.piecewise and sink.receipt_checksum is not None
    checksum = BY_NAME[sink.receipt_checksum] if sink.receipt_checksum else None
    source = plan.source
    try:
        for i, c in todo:
            buf: memoryview | None = _until_stopped(pool.get, stop)
            if buf is None:
                return
            producer = plan.outputs[c.index].producer
            raw, pieces = _direct_range(plan, sink, c, buf) \
                if piecewise and c.length and type(producer) is Copy else (None, None)
            if raw is not None and pieces is not None:
                _prefetch(raw, pieces.span)
                filled.put(_Item(i, c, buf, pieces=pieces))
                if not read_direct(sink, c, raw, pieces, stop):
                    return
                continue
            view = buf[: c.length]
            segs = producer.fill(c.offset, view, source.read_into) if c.length else []
            filled.put(_Item(i, c, buf, segs, checksum(view) if checksum else None))
        filled.put(None)
    except BaseException as e:  # handed to the writer, which raises it
        filled.put(e)


def _direct_range(plan: Plan, sink: Sink, c: Chunk, buf: memoryview) -> tuple[RawRange | None, _Pieces | None]:
    """Where the source stores chunk ``c`` verbatim (widened to whole pages of the sink's file
    where the tensor allows, see ``_Pieces``), and the pieces to copy it in; (None, None) if it
    is not stored verbatim."""
    producer = plan.outputs[c.index].producer
    assert type(producer) is Copy
    skew = sink.page_offset(c)
    back = fwd = 0
    if skew is not None:
        back = skew if skew <= c.offset else 0
        fwd = -(skew + c.length) % ALIGN
        if c.offset + c.length + fwd > plan.outputs[c.index].nbytes:
            fwd = 0
        if back or fwd:
            raw = plan.source.raw_range(producer.source, c.offset - back, c.length + back + fwd)
            if raw is not None:
                return raw, _Pieces(buf, c.length, skew, back, fwd)
    raw = plan.source.raw_range(producer.source, c.offset, c.length)
    return (raw, _Pieces(buf, c.length, skew)) if raw is not None else (None, None)


def _prefetch(raw: RawRange, length: int) -> None:
    """Ask the kernel to start reading a direct chunk now (a cold cache then overlaps reads)."""
    try:
        os.posix_fadvise(raw.fd, raw.offset, length, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass


def read_direct(sink: Sink, chunk: Chunk, raw: RawRange, pieces: _Pieces, stop: threading.Event) -> bool:
    """Read ``chunk`` from ``raw`` into ``pieces``, one piece at a time, continuing the source's
    checksum and the sink's receipt checksum over each while it is in cache, and hand each to
    the writer. Returns False if the writer stopped meanwhile (or this read failed: the writer
    gets the error through ``pieces``)."""
    src = BY_NAME[raw.algorithm] if raw.unit is not None and raw.algorithm else None
    assert sink.receipt_checksum is not None
    out = BY_NAME[sink.receipt_checksum]
    same = src is out
    s = r = 0
    # Names bound once: this loop runs once per MiB, and what Python does per piece runs with
    # caches just flushed by the piece's bytes.
    free, ready, slots, piece, span, fd = pieces.free.get, pieces.ready.put, pieces.slots, pieces.piece, \
        pieces.span, raw.fd
    back, end = pieces.back, pieces.back + chunk.length  # the chunk's own bytes: checksummed
    try:
        for k in range(0, span, piece):
            try:
                slot: int | None = free(timeout=0.1)
            except queue.Empty:
                slot = _until_stopped(free, stop)
            if slot is None or stop.is_set():
                return False
            n = min(piece, span - k)
            view = slots[slot][:n]
            for j in range(0, n, READ_STEP):  # each step checksummed while in the CPU's cache
                m, at = min(READ_STEP, n - j), k + j
                sub = view[j:j + m]
                try:
                    got = os.preadv(fd, [sub], raw.offset + at)
                except OSError:
                    got = 0  # pread_exact reads it again and names the file and tensor in its error
                if got != m:
                    pread_exact(fd, sub[got:], raw.offset + at + got, raw.file, raw.tensor)
                own = sub if back <= at and at + m <= end else sub[max(0, back - at):max(0, min(m, end - at))]
                if src is not None:
                    s = src(own, s)
                r = s if same else out(own, r)
            ready((slot, n))
    except BaseException as e:  # the writer raises it
        pieces.ready.put(e)
        return False
    pieces.receipt = r
    pieces.segs = [Segment(raw.unit, raw.unit_offset + back, chunk.length, s)] \
        if raw.unit is not None and src else []
    pieces.ready.put(None)
    return True


def write_direct(sink: Sink, chunk: Chunk, pieces: _Pieces) -> tuple[int, list[Segment]]:
    """Write the pieces of ``chunk`` as the reader hands them over (``read_direct``).

    Returns: (the chunk's receipt, its source checksum segments). Raises: what the reader
    raised (SourceError, FormatError for a short file) and what ``write_part`` raises."""
    k = 0
    get, free, slots, write, index, offset = pieces.ready.get, pieces.free.put, pieces.slots, sink.write_part, \
        chunk.index, chunk.offset - pieces.back
    while (got := get()) is not None:
        if isinstance(got, BaseException):
            raise got
        slot, n = got
        write(Chunk(index, offset + k, n), slots[slot][:n])
        free(slot)
        k += n
    return pieces.receipt, pieces.segs


def _pending(receipt: Any) -> bool:
    return callable(getattr(receipt, "result", None))


class _Writer:
    """This thread's half: writes items, keeps pending ones in flight, journals them in order."""

    def __init__(self, plan: Plan, sink: Sink, journal: Journal, tracker: IntegrityTracker,
                 done: dict[int, dict[str, Any]], pool: BufferPool, bar: Any, in_flight: int, durable: bool) -> None:
        self.plan, self.sink, self.journal, self.tracker, self.done = plan, sink, journal, tracker, done
        self.pool, self.bar, self.in_flight = pool, bar, max(1, in_flight)
        self.flight: deque[_Item] = deque()
        self.mark = durable
        self.since_mark = 0
        self.journaled = len(done)
        self._sync: tuple[threading.Thread, list[Any], int] | None = None
        self.marks = 0

    def write(self, item: _Item) -> None:
        c = item.chunk
        if item.pieces is not None:
            item.receipt, item.segs = write_direct(self.sink, c, item.pieces)
        else:
            item.receipt = self.sink.write(c, item.buf[: c.length], item.crc)
        self.flight.append(item)
        self.settle(block=True, keep=self.in_flight)

    def settle(self, block: bool, keep: int | None = None) -> None:
        """Journal finished writes in order; with ``block``, wait until at most ``keep`` remain."""
        keep = self.in_flight if keep is None else keep
        while self.flight:
            head = self.flight[0]
            waiting = _pending(head.receipt) and not head.receipt.done()
            if waiting and not (block and len(self.flight) > keep):
                return
            self.flight.popleft()
            self._journal(head)

    def _journal(self, item: _Item) -> None:
        c, receipt = item.chunk, item.receipt
        if _pending(receipt):
            receipt = receipt.result()
        self.tracker.add(item.segs)
        rec = {"i": item.i, "o": c.offset, "n": c.length, "r": receipt, "s": [list(s) for s in item.segs]}
        hook(f"chunk:{item.i}")
        self.journal.append(rec)
        hook(f"journal:{item.i}")
        self.done[item.i] = rec
        self.journaled += 1
        self.pool.put(item.buf)
        if self.bar is not None:
            self.bar.update(c.length)
        self.since_mark += c.length
        self.poll_sync()
        if self.mark and self.since_mark >= MARK_BYTES and self._sync is None:
            self._start_sync()

    def _start_sync(self) -> None:
        """Sync the sink on another thread; the mark for the chunks journaled so far follows
        once it is done (``poll_sync``). Sinks sync safely beside writes (``Sink.sync``)."""
        box: list[Any] = []

        def sync() -> None:
            try:
                box.append(self.sink.sync())
            except BaseException as e:  # raised in this thread by poll_sync
                box.append(e)

        thread = threading.Thread(target=sync, name="shardconv-sync", daemon=True)
        thread.start()
        self._sync = (thread, box, self.journaled)
        self.since_mark = 0

    def poll_sync(self, wait: bool = False) -> None:
        """Journal the durable mark of a finished sync (with ``wait``, after waiting for it).
        Raises: what the sync raised (a DurabilityError)."""
        if self._sync is None:
            return
        thread, box, n = self._sync
        if wait:
            thread.join()
        elif thread.is_alive():
            return
        self._sync = None
        result = box[0] if box else False
        if isinstance(result, BaseException):
            raise result
        if result:
            self.journal.append({"d": n})
            self.marks += 1
            hook(f"mark:{self.marks}")

    def stop_sync(self) -> None:
        """Wait for a sync still running (before the sink's files are closed), ignoring it."""
        if self._sync is not None:
            self._sync[0].join()
            self._sync = None
