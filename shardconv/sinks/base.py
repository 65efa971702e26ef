"""The sink contract: accept output tensors as byte chunks, in any order, then finish.

A sink's life, driven by the engine (or, for a conversion split over processes, by a
coordinator and its workers):

1. **construct** from its options (``Sink.Options``, a ``SinkOptions`` dataclass whose field
   metadata also generates the command-line flags) and declare what it can hold
   (``capabilities``, ``leave_out``, ``check_outputs``); nothing is written yet.
2. **prepare** (``open`` with ``ctx.resume`` false): lay out a new partial output at ``out``
   from the plan alone (files created and sized, headers whose bytes the plan fixes). Replaces
   what an earlier run left at ``out``; never touches anything else.
3. **attach** (``open`` with ``ctx.resume`` true): open the partial output an earlier prepare
   made, for writing and checking chunks. NON-DESTRUCTIVE: attaching to a half-written or a
   finished output changes no byte of it (no truncation, no deletion, no header rewritten);
   anything that must change before a chunk is rewritten is changed by that ``write``.
4. **write** any chunk, in any order, any number of times (idempotent); each returns a small
   JSON-able receipt (e.g. a CRC) the journal keeps; **check** re-checks a journaled chunk.
5. **finish**: write what depends on every chunk (zip directory, metadata), fsync when
   ``ctx.durable``, and return the renames that publish the result. Never edits the manifest
   it is given. Then **close** (always, once, also after a failure).

The layout must be a pure function of the outputs, the options and ``ctx.chunk_bytes``, so
every process that prepares or attaches agrees on where each byte goes.

Adding a format takes three places: its module (a ``Sink`` subclass), one line in
``sinks.REGISTRY`` (or ``sinks.register``) and one ``testing.SinkTests`` subclass.
"""
from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..core.destination import Destination, SinkContext
from ..core.plan import Chunk, OutputTensor
from ..errors import UsageError
from ..frontend import option_name
from ..util.dtypes import STRING

__all__ = ["Capabilities", "Chunk", "Destination", "NoOptions", "OutputTensor", "Sink", "SinkContext",
           "SinkOptions", "sink_option"]


@dataclass(frozen=True)
class Capabilities:
    """What a format can hold, declared by its sink (checked before anything is written).

    ``nested_names``: a ``/`` in a name makes a group (so a name cannot be both a tensor and a
    group). ``string_tensors``: it stores string tensors. ``dtypes``: the dtypes it stores
    (None: every dtype shardconv knows). ``remote``: it writes to object-store URLs.
    ``piecewise``: ``write_part`` stores any contiguous part of a chunk, and a chunk's receipt
    is its ``receipt_checksum``; the engine then copies a chunk whose bytes lie verbatim in a
    source file in cache-sized pieces (each read, checksummed and written while in cache).
    """

    nested_names: bool = False
    string_tensors: bool = False
    dtypes: frozenset[str] | None = None
    remote: bool = False
    piecewise: bool = False


def sink_option(default: Any = None, help: str = "", *, metavar: str | None = None,
                choices: Sequence[Any] | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A ``SinkOptions`` field with its command-line metadata: ``--NAME`` (underscores as dashes)
    with ``help``, ``metavar`` and ``choices``; ``parse`` turns the text given on the command line
    (or a string given from Python) into the value.

    Returns: a ``dataclasses.field``. Raises: nothing."""
    meta = {"help": help, "metavar": metavar, "choices": tuple(choices) if choices else None, "parse": parse}
    return dataclasses.field(default=default, metadata={"cli": meta})


@dataclass(frozen=True)
class SinkOptions:
    """A sink's options: a frozen dataclass whose fields are ``sink_option``s.

    A field left at None was not given. Strings given for a field with ``parse`` are parsed
    (so ``"5GB"`` works from Python as on the command line); ``validate`` then checks the values.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            meta = f.metadata.get("cli", {})
            value = getattr(self, f.name)
            if isinstance(value, str) and meta.get("parse") is not None:
                try:
                    value = meta["parse"](value)
                except (TypeError, ValueError) as e:
                    raise UsageError(f"{option_name(f.name)}: {value!r} is not a valid value ({e})") from None
                object.__setattr__(self, f.name, value)
            if value is not None and meta.get("choices") and value not in meta["choices"]:
                raise UsageError(f"{option_name(f.name)} must be one of "
                                 f"{', '.join(map(str, meta['choices']))}, not {value!r}")
        self.validate()

    def validate(self) -> None:
        """Check the values together. Returns: None. Raises: UsageError naming the option."""

    @classmethod
    def build(cls, fmt: str, values: dict[str, Any]) -> SinkOptions:
        """The options ``values`` give (unknown names refused, None values left at their defaults).

        Returns: an instance of ``cls``. Raises: UsageError for an option format ``fmt`` does not
        take, or a value ``validate`` refuses."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"output format {fmt!r} does not take the option(s) "
                             f"{', '.join(map(option_name, unknown))}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def recorded(self) -> dict[str, Any]:
        """The options given (fields not None), as recorded in journals and manifests.

        Returns: a JSON-able dict. Raises: nothing."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class NoOptions(SinkOptions):
    """The options of a sink that takes none."""


class Sink(ABC):
    """One output format. Subclass it, set ``name``, ``Options`` and ``capabilities``, and
    implement ``prepare``, ``attach``, ``write``, ``check`` and ``finish``."""

    #: Format name used in ``--to`` and manifests.
    name: ClassVar[str] = "?"
    #: The options dataclass; its fields become ``--flags`` of ``convert`` and ``plan``.
    Options: ClassVar[type[SinkOptions]] = NoOptions
    #: Help for the command-line group of this sink's options.
    options_help: ClassVar[str] = ""
    #: What the format can hold (an instance may narrow it from its options).
    capabilities: Capabilities = Capabilities()
    #: The checksum of a chunk's bytes ("crc32" or "crc32c") that is the chunk's receipt, if any:
    #: the engine computes it while the bytes are in cache and hands it to ``write``.
    receipt_checksum: ClassVar[str | None] = None
    #: What the main output is at its final path: "file" or "directory". Checked before the
    #: first byte: ``--overwrite`` replaces an output of the same kind only.
    output_kind: str = "directory"

    def __init__(self, options: SinkOptions | None = None) -> None:
        """Raises: UsageError if ``options`` is not this sink's ``Options``."""
        if options is not None and not isinstance(options, self.Options):
            raise UsageError(f"{self.name}: options must be {self.Options.__name__}, not {type(options).__name__}")
        self.opts = options if options is not None else self.Options()
        self.ctx: SinkContext | None = None

    # -- what the format is and holds (no I/O; before anything is written) -------------------

    def options(self) -> dict[str, Any]:
        """Options that change the output bytes; a resume with different ones is refused.

        Returns: a JSON-able dict (by default the options given). Raises: nothing."""
        return self.opts.recorded()

    def final_paths(self, dest: Path) -> list[Path]:
        """Every local path the committed output at ``dest`` occupies, the main output last.

        Returns: paths (``[dest]`` by default). Raises: nothing."""
        return [dest]

    def exists(self, dest: Destination) -> bool:
        """True if an output is at ``dest`` (a dangling link too): refused without ``overwrite``.

        Returns: bool. Raises: DestinationError if the destination cannot be inspected."""
        return any(os.path.lexists(p) for p in self.final_paths(dest.path)[-1:])

    def leave_out(self, output: OutputTensor) -> str | None:
        """Why this format cannot hold ``output`` (a dtype it has no code for), or None. Such
        outputs are left out of the plan with that reason, shown by ``plan`` and ``convert``.

        Returns: a reason or None (by default from ``capabilities.dtypes``). Raises: nothing."""
        dtypes = self.capabilities.dtypes
        if dtypes is not None and output.dtype not in dtypes and output.dtype != STRING:
            return f"{output.dtype} has no {self.name} dtype (it holds {', '.join(sorted(dtypes))})"
        return None

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Problems with names, dtypes or shapes this format cannot hold, one line each.

        Called before anything is written (no lock, no ``DEST.partial``), so a refusal leaves
        nothing behind. Returns: the problems (by default: string tensors without the
        capability, and with ``nested_names`` a name that is also a group). Raises: nothing."""
        problems = []
        if not self.capabilities.string_tensors:
            problems += [f"{o.name!r}: string tensors cannot be stored in {self.name}; drop or map them"
                         for o in outputs if o.dtype == STRING]
        if self.capabilities.nested_names:
            names = {o.name for o in outputs}
            problems += [f"{o.name!r}: is both a tensor and a group in {self.name}; rename it with a rule"
                         for o in outputs if any(n.startswith(o.name + "/") for n in names)]
        return problems

    def chunk_grid(self, output: OutputTensor) -> tuple[int, ...]:
        """The sink's own chunk shape for ``output`` (e.g. a Zarr array's chunks), from the
        output and the options alone; the engine cuts its chunks into whole cells of it.

        Returns: one extent per axis, or () for no grid (the default). Raises: nothing."""
        return ()

    def min_chunk_bytes(self, outputs: list[OutputTensor]) -> tuple[int, str]:
        """The smallest engine chunk that holds one whole cell of every output's grid, and
        what needs it (for the refusal of a budget too small); the output's bytes must not
        depend on the budget, so the engine refuses rather than cut a cell.

        Returns: (bytes, why); (0, "") by default. Raises: nothing."""
        return 0, ""

    def baseline_bytes(self) -> int:
        """Memory the sink's libraries take once loaded (e.g. TensorFlow), for estimates.

        Returns: bytes. Raises: nothing."""
        return 0

    def scratch_slots(self) -> int:
        """Chunk-sized buffers the sink needs beside the pool (charged to the budget).

        Returns: a count. Raises: nothing."""
        return 0

    # -- the partial output -----------------------------------------------------------------

    def open(self, out: Path, outputs: list[OutputTensor], ctx: SinkContext) -> None:
        """Make the partial output at ``out`` (inside the staging directory) ready for chunks:
        ``attach`` to it with ``ctx.resume``, else ``prepare`` it.

        Returns: None. Raises: DestinationError (no room, a path shardconv did not make, I/O)."""
        self.ctx = ctx
        if ctx.resume:
            self.attach(out, outputs)
        else:
            self.prepare(out, outputs)

    @abstractmethod
    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Lay out a new partial output for ``outputs`` at ``out`` (``self.ctx`` is set):
        anything an earlier run left at ``out`` is replaced; nothing else is touched.

        Returns: None. Raises: DestinationError (no room, I/O, a foreign object-store prefix)."""

    @abstractmethod
    def attach(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Open the partial output at ``out`` that a ``prepare`` for the same outputs, options and
        chunk size made, without changing any byte of it (finished or not).

        Returns: None. Raises: DestinationError if it cannot be opened."""

    @abstractmethod
    def write(self, chunk: Chunk, data: memoryview, crc: int | None = None) -> Any:
        """Store one chunk (``data`` is ``chunk.length`` bytes of output ``chunk.index`` from
        ``chunk.offset``); idempotent. ``crc``: the ``receipt_checksum`` of ``data``, computed by
        the engine while the bytes were in cache (None: not computed; compute it).

        Returns: a JSON-able receipt (journaled, given back to ``check`` and ``finish``), or a
        pending one: an object whose ``result()`` waits for the write and returns the receipt
        (the engine keeps ``data`` untouched until then, and journals chunks in order).
        Raises: DestinationError or DurabilityError on I/O failure."""

    def sync(self) -> bool:
        """Make every chunk written so far durable (fsync), so the engine can journal a durable
        mark and a resume keep those chunks without reading them again. The engine calls it on
        another thread while ``write`` goes on: it must be safe beside writes, and must cover at
        least every chunk whose write had returned (or whose receipt had) when it was called.

        Returns: True if done; False if the sink cannot (a resume then re-checks every chunk).
        Raises: DurabilityError (the engine then discards the partial output)."""
        return False

    def write_part(self, chunk: Chunk, data: memoryview) -> None:
        """Store a contiguous part of a chunk (``capabilities.piecewise`` sinks only), or of its
        output around it (see ``page_offset``); the engine makes the chunk's receipt, its
        ``receipt_checksum``, from the chunk's own bytes.

        Returns: None. Raises: DestinationError or DurabilityError on I/O failure."""
        raise NotImplementedError(f"the {self.name} sink does not store parts of chunks")

    def page_offset(self, chunk: Chunk) -> int | None:
        """Where in a page (``util.uncached.ALIGN`` bytes) the chunk's first byte goes in its
        file (``capabilities.piecewise`` sinks): the engine lays the chunk's parts out in memory
        at that offset, and widens them to whole pages with the bytes of the same output on
        either side (``write_part`` then gets parts that start before or end after the chunk),
        so a part's page-aligned middle can be written past the page cache.

        Returns: 0 .. ALIGN - 1, or None (the default): the sink writes no file pages, or
        writes this chunk's output through the page cache (a tensor that does not start on a
        page: direct writes beside cached pages of the same tensor fragment the file), and
        gets only the chunk's own bytes. Raises: nothing."""
        return None

    @abstractmethod
    def check(self, chunk: Chunk, receipt: Any) -> bool:
        """Whether a chunk journaled by an earlier run is intact in the partial output.

        Returns: True if its bytes match ``receipt`` (missing or unreadable: False).
        Raises: nothing for a damaged chunk; DestinationError if the output cannot be read."""

    @abstractmethod
    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
        """Complete the output: what depends on every chunk, ``manifest`` (not modified) wherever
        the format keeps it, all of it fsynced when ``ctx.durable``.

        ``receipts`` holds every chunk of the plan once, with the receipt its write returned.
        Returns: (staged path, final path) renames, the main output last; none for an output
        that marks its own completion (an object store). Raises: DestinationError,
        DurabilityError (a failed fsync: the engine then discards the partial output)."""

    def close(self) -> None:
        """Release what ``open`` holds (file descriptors, handles); the engine calls it once.

        Returns: None. Raises: nothing."""
        return None
