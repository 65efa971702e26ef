"""The memory budget and the pool of preallocated chunk buffers charged to it."""
from __future__ import annotations

import ctypes
import mmap
import queue
from dataclasses import dataclass

from ..errors import BudgetError
from ..frontend import option
from ..util.uncached import ALIGN
from ..util.units import format_size

#: Largest chunk: bigger buffers stop paying off (measured) and cost page faults.
MAX_CHUNK = 16 << 20
MIN_CHUNK = 64 << 10
#: Buffers in flight: two being filled/queued by the reader, two being written.
N_BUFFERS = 4
#: Bytes a pool buffer has beyond its chunk (``Budget.buffer_bytes``).
BUFFER_SLACK = 2 * ALIGN
#: A huge page. Pool buffers of ``HUGE_FROM`` bytes or more are whole huge pages where the
#: kernel gives them (Linux transparent huge pages, "madvise" mode included): a write past the
#: page cache from one goes to the device in requests of up to 4 MiB, where 4 KiB pages that
#: happen to lie apart cut it into requests of 0.5-2 MiB, and the copy took up to twice as
#: long (bench/README.md, "Writing past the page cache").
HUGE = 2 << 20
HUGE_FROM = 2 * HUGE


@dataclass(frozen=True)
class Budget:
    """``max_memory`` bytes split into a buffer pool and per-chunk scratch space."""

    max_memory: int
    chunk_bytes: int
    n_buffers: int = N_BUFFERS

    @property
    def buffer_bytes(self) -> int:
        """A pool buffer's size: a chunk and two pages more, so that a chunk's parts can be
        widened to whole pages and lie in memory as they lie in their file (``Sink.page_offset``);
        whole huge pages from ``HUGE_FROM`` on, all of them charged."""
        size = self.chunk_bytes + BUFFER_SLACK
        return -(-size // HUGE) * HUGE if size >= HUGE_FROM else size

    @classmethod
    def for_limit(cls, max_memory: int, chunk_bytes: int | None = None, scratch_factor: int = 0,
                  reserve: tuple[int, str] = (0, "")) -> Budget:
        """Choose the chunk size: buffers + scratch use at most half the budget,
        leaving the rest for source metadata, the journal and sink bookkeeping.
        ``reserve`` (bytes, why) is what the source holds within the budget
        (``Source.budget_reserve``): it comes off the top first."""
        slots = N_BUFFERS + scratch_factor
        held, why = reserve
        room = max_memory - held
        if chunk_bytes is None:
            chunk_bytes = min(MAX_CHUNK, max(0, room) // (2 * slots))
            chunk_bytes -= chunk_bytes % 4096
        if chunk_bytes < MIN_CHUNK:
            need = -(-(held + 2 * slots * MIN_CHUNK) // (1 << 20))  # whole MiB, rounded up
            raise BudgetError(f"{option('max_memory', format_size(max_memory))} is too small: at least {need}MiB is "
                              "needed" + (f" ({why})" if why else ""))
        budget = cls(max_memory, chunk_bytes)
        if budget.buffer_bytes * slots > room:
            raise BudgetError(f"chunks of {format_size(chunk_bytes)} (from the partial output's journal) do not fit "
                              f"{option('max_memory', format_size(max_memory))}; raise it or use {option('restart')}")
        return budget

    @staticmethod
    def limit_for(chunk_bytes: int, scratch_factor: int = 0, reserve: tuple[int, str] = (0, "")) -> int:
        """The smallest ``max_memory`` (whole MiB) for which ``for_limit`` chooses chunks of at
        least ``chunk_bytes`` (at most ``MAX_CHUNK``). Returns: bytes. Raises: nothing."""
        chunk = -(-max(chunk_bytes, MIN_CHUNK) // 4096) * 4096
        need = reserve[0] + 2 * (N_BUFFERS + scratch_factor) * chunk
        return -(-need // (1 << 20)) << 20


def aligned_empty(size: int, huge: bool = False) -> memoryview:
    """A writable byte buffer whose start is page aligned (libraries such as TensorFlow need
    64 bytes). Anonymous memory: its pages are taken only when first touched, as
    ``np.empty`` does, and a conversion that copies directly needs no NumPy for it.

    ``huge``: private memory starting on a huge page, which the kernel is asked to back with
    huge pages (``HUGE``), physically contiguous; ``size`` should be a multiple of ``HUGE``."""
    if not huge or not hasattr(mmap, "MADV_HUGEPAGE"):
        return memoryview(mmap.mmap(-1, max(size, 1)))[:size]
    # Shared anonymous memory (mmap's default) is shmem, which gets no huge pages on "madvise".
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, skip, size)
    except OSError:
        pass  # no transparent huge pages: 4 KiB pages, slower writes past the cache, same bytes
    return memoryview(m)[skip:skip + size]


class BufferPool:
    """``n`` preallocated byte buffers reused for every chunk (no per-chunk allocation)."""

    def __init__(self, n: int, size: int) -> None:
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(n):
            self._free.put(aligned_empty(size, huge=size >= HUGE_FROM))

    def get(self, timeout: float | None = None) -> memoryview:
        return self._free.get(timeout=timeout)

    def put(self, buf: memoryview) -> None:
        self._free.put(buf)
