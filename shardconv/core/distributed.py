"""One conversion split over workers, in three phases on any executor.

* ``prepare`` (the coordinator, once): checks everything ``engine.run`` checks before
  its lock, lays out the partial output (``Sink.open`` with ``resume`` false), fixes the
  chunk size and cuts the chunks into shares (``core/shares.py``), and writes the share
  table ``DEST.partial/shares.json`` with what a worker must find unchanged (plan digest,
  source fingerprint, sink and options, chunk size). Preparing again with the same
  table changes nothing.
* ``run_share`` (any worker, any number of times, also two at once): rebuilds nothing
  itself (the caller gives it the plan, rebuilt from paths), refuses a table of another
  plan, attaches to the partial output (non-destructive), writes the share's chunks and
  journals each in its own file per share and attempt (``shares/K-ATTEMPT.jsonl``), with
  durable marks as ``engine.run`` writes them. A rerun keeps every chunk an earlier attempt
  journaled: unread if that attempt ran on this boot of this machine or a durable mark
  vouches for it, else if it is intact in the output.
  Workers take no lock: every write lands at a place the plan fixes, so repeating one
  is harmless, and no lock is needed on file systems where ``flock`` is unreliable.
* ``finalize`` (the coordinator): reads no tensor data. It gathers the receipts of every
  chunk from the share journals, checks the source checksums from the segments the
  workers recorded, has the sink write what depends on every chunk (zip directory,
  metadata) and publishes the output with the same atomic rename as ``engine.run``.

The output is byte-identical to a single-process ``engine.run`` with the same budget.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DestinationError, ResumeError
from ..frontend import option
from ..progress import ProgressArg
from ..util import safefs
from . import engine, pipeline
from .budget import Budget
from .destination import Destination, SinkContext
from .integrity import IntegrityTracker
from .journal import Journal, boot_id
from .plan import Chunk, Plan, chunk_plan
from .shares import Share, cut_shares
from .staging import Staging

if TYPE_CHECKING:  # the contract only
    from ..sinks.base import Sink

TABLE = "shares.json"
TABLE_FORMAT = "shardconv-shares"
TABLE_VERSION = 1
JOURNALS = "shares"


@dataclass(frozen=True)
class ShareTable:
    """What ``prepare`` fixed: the run's header, its chunk size and its shares."""

    header: dict[str, Any]
    chunk_bytes: int
    shares: list[Share]
    #: How workers rebuild the plan (paths and options), so ``finalize DEST`` needs nothing else.
    job: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "header": self.header, "job": self.job,
                "chunk_bytes": self.chunk_bytes, "shares": [[s.start, s.stop, s.nbytes] for s in self.shares]}

    @classmethod
    def from_json(cls, obj: Any, path: Path) -> ShareTable:
        """Raises: ResumeError for anything but a table this version wrote."""
        try:
            if obj["format"] != TABLE_FORMAT or obj["version"] != TABLE_VERSION:
                raise ValueError(f"format {obj.get('format')!r} version {obj.get('version')!r}")
            shares = [Share(k, int(a), int(b), int(n)) for k, (a, b, n) in enumerate(obj["shares"])]
            job = obj.get("job")
            return cls(dict(obj["header"]), int(obj["chunk_bytes"]), shares, dict(job) if job else None)
        except (KeyError, TypeError, ValueError) as e:
            raise ResumeError(f"{path}: not a share table shardconv wrote ({e}); rerun the coordinator with "
                              f"{option('restart')}") from None


@dataclass(frozen=True)
class ShareResult:
    """What one ``run_share`` did: chunks written now and chunks an earlier attempt had written."""

    index: int
    chunks_written: int
    chunks_resumed: int
    bytes_written: int
    seconds: float


def load_table(staging: Staging) -> ShareTable | None:
    """The share table of the partial output at ``staging``, or None if there is none.

    Raises: ResumeError if it is unreadable or not ours."""
    path = staging.dir / TABLE
    try:
        data = path.read_bytes() if safefs.lstat(path) is not None else None
    except OSError as e:
        raise ResumeError(f"{path}: cannot read the share table ({e.strerror})") from None
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        raise ResumeError(f"{path}: the share table is not JSON; rerun the coordinator with "
                          f"{option('restart')}") from None
    return ShareTable.from_json(obj, path)


def prepare(plan: Plan, sink: Sink, dest: str | os.PathLike[str] | Destination, *, max_memory: int,
            overwrite: bool = False, restart: bool = False, fsync: bool = True, chunk_bytes: int | None = None,
            share_bytes: int | None = None, job: dict[str, Any] | None = None) -> ShareTable:
    """Lay out the partial output and write its share table (or keep the one there, when it is
    of this same run). Returns: the table. Raises: what ``engine.run`` raises before its first
    chunk (PlanError, BudgetError, UsageError, DestinationError, ResumeError)."""
    where = Destination.parse(dest)
    scratch = engine._refuse_before_lock(plan, sink, where, overwrite, max_memory, chunk_bytes)
    where.make_state_dir()
    staging = Staging(where.path)
    staging.acquire()
    try:
        header = engine._header(plan, sink)
        table = None if restart else load_table(staging)
        if table is not None:
            engine._check_resumable(table.header, header, staging)
            return table
        if restart or staging.has_leftovers():
            staging.reset()
        budget = Budget.for_limit(max_memory, chunk_bytes, scratch_factor=scratch,
                                  reserve=plan.source.budget_reserve())
        ctx = SinkContext(where, durable=fsync, chunk_bytes=budget.chunk_bytes, resume=False, source=plan.source)
        sink.open(staging.out, plan.outputs, ctx)
        chunks = chunk_plan(plan.outputs, budget.chunk_bytes, sink.chunk_grid)
        table = ShareTable(header, budget.chunk_bytes, cut_shares(chunks, share_bytes), job)
        safefs.write_json(staging.dir / TABLE, table.to_json(), fsync)
        return table
    finally:
        sink.close()
        staging.release(remove=False)


def _attached(plan: Plan, sink: Sink, where: Destination, staging: Staging, fsync: bool,
              expected: ShareTable | None = None) -> tuple[ShareTable, list[Chunk]]:
    """The table of a prepared output of this run, with the sink attached to it."""
    table = load_table(staging)
    if table is None:
        raise ResumeError(f"{where.label}: no prepared output to work on (no {staging.dir / TABLE}); "
                          "run the coordinator (prepare) first")
    engine._check_resumable(table.header, engine._header(plan, sink), staging)
    if expected is not None and expected != table:
        raise ResumeError(f"{staging.dir / TABLE}: was replaced since this run prepared it; rerun the coordinator")
    ctx = SinkContext(where, durable=fsync, chunk_bytes=table.chunk_bytes, resume=True, source=plan.source)
    sink.open(staging.out, plan.outputs, ctx)
    return table, chunk_plan(plan.outputs, table.chunk_bytes, sink.chunk_grid)


def _share_journals(staging: Staging, index: int | None) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The (header, records) of every journal of share ``index`` (None: every share), one per
    attempt."""
    folder = staging.dir / JOURNALS
    if safefs.lstat(folder) is None:
        return []
    prefix = "" if index is None else f"{index:06d}-"
    journals = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".jsonl"):
            loaded = Journal(folder / name).load()
            if loaded:
                journals.append(loaded)
    return journals


def _share_records(staging: Staging, index: int | None) -> list[dict[str, Any]]:
    """Every record journaled for share ``index`` (None: every share), all attempts."""
    return [rec for _, records in _share_journals(staging, index) for rec in records]


def _kept_share_chunks(staging: Staging, share: Share, chunks: list[Chunk], sink: Sink,
                       tracker: IntegrityTracker) -> tuple[dict[int, dict[str, Any]], int]:
    """The chunks of ``share`` that earlier attempts journaled and that are intact, the durable
    ones first, and how many those are. As in ``engine.run``: kept unread if journaled on this
    boot of this machine or vouched for by a durable mark of their journal; read back otherwise."""
    boot = boot_id()
    durable: list[tuple[int, dict[str, Any]]] = []
    rest: list[tuple[int, dict[str, Any]]] = []
    done: dict[int, dict[str, Any]] = {}
    for header, records in _share_journals(staging, share.index):
        same_boot = bool(boot and header.get("boot") == boot)
        before = len(done)
        _, trusted = engine._kept_chunks(records, chunks, sink, tracker, same_boot,
                                         within=range(share.start, share.stop), done=done)
        added = list(done.items())[before:]
        durable += added[:trusted]
        rest += added[trusted:]
    return dict(durable + rest), len(durable)


def run_share(plan: Plan, sink: Sink, dest: str | os.PathLike[str] | Destination, index: int, *,
              max_memory: int, fsync: bool = True, progress: ProgressArg = False,
              expected: ShareTable | None = None) -> ShareResult:
    """Write share ``index`` of a prepared output; resumes what an earlier attempt journaled.

    Returns: the ShareResult. Raises: ResumeError (not prepared, or prepared for another plan,
    source or options), SourceError, ChecksumError, DestinationError, DurabilityError."""
    t0 = time.monotonic()
    where = Destination.parse(dest)
    staging = Staging(where.path)
    try:
        table, chunks = _attached(plan, sink, where, staging, fsync, expected)
        if not 0 <= index < len(table.shares):
            raise ResumeError(f"{where.label}: share {index} does not exist (the table has {len(table.shares)})")
        share = table.shares[index]
        tracker = IntegrityTracker(plan.source.units())
        done, trusted = _kept_share_chunks(staging, share, chunks, sink, tracker)
        budget = Budget.for_limit(max_memory, table.chunk_bytes, scratch_factor=engine._scratch_slots(plan, sink),
                                  reserve=plan.source.budget_reserve())
        todo = [(i, chunks[i]) for i in range(share.start, share.stop) if i not in done]
        journal = _share_journal(staging, index, table, done, trusted, fsync)
        try:
            resumed = sum(chunks[i].length for i in done)
            pipeline.run(plan, sink, journal, tracker, todo, done, budget, progress, share.nbytes, resumed,
                         f"{where.path.name} share {index}", durable=fsync)
        finally:
            journal.close()
        return ShareResult(index, len(todo), len(done) - len(todo), sum(c.length for _, c in todo),
                           time.monotonic() - t0)
    finally:
        sink.close()


def _share_journal(staging: Staging, index: int, table: ShareTable, kept: dict[int, dict[str, Any]],
                   trusted: int, fsync: bool) -> Journal:
    """A new journal file for this attempt at share ``index``, holding the records it keeps
    (the first ``trusted`` still vouched for by a durable mark) and this machine's boot."""
    folder = staging.dir / JOURNALS
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DestinationError(f"{folder}: cannot create the share journals' directory: {e.strerror}") from None
    journal = Journal(folder / f"{index:06d}-{uuid.uuid4().hex[:12]}.jsonl")
    records = list(kept.values())
    journal.start({**table.header, "chunk_bytes": table.chunk_bytes, "share": index, "boot": boot_id()},
                  records[:trusted] + ([{"d": trusted}] if trusted else []) + records[trusted:], durable=fsync)
    return journal


def missing_shares(dest: str | os.PathLike[str] | Destination) -> list[int]:
    """The shares of a prepared output not every chunk of which is journaled (reads no data)."""
    staging = Staging(Destination.parse(dest).path)
    table = load_table(staging)
    if table is None:
        return []
    have = {r.get("i") for r in _share_records(staging, None)}
    return [s.index for s in table.shares if any(i not in have for i in range(s.start, s.stop))]


def finalize(plan: Plan, sink: Sink, dest: str | os.PathLike[str] | Destination, *, overwrite: bool = False,
             fsync: bool = True, expected: ShareTable | None = None, t0: float | None = None) -> engine.Result:
    """Check every share is done and publish the output; reads no tensor data of the output.

    Returns: the Result. Raises: ResumeError naming unfinished shares; ChecksumError or
    SourceChangedError if the input is not what the workers read; DestinationError."""
    t0 = time.monotonic() if t0 is None else t0
    where = Destination.parse(dest)
    staging = Staging(where.path)
    staging.acquire()
    committed = False
    try:
        table, chunks = _attached(plan, sink, where, staging, fsync, expected)
        records = _records_by_chunk(staging, chunks)
        missing = sorted({s.index for s in table.shares for i in range(s.start, s.stop) if i not in records})
        if missing:
            raise ResumeError(f"{where.label}: {len(missing)} of {len(table.shares)} shares are not finished "
                              f"(first: {', '.join(map(str, missing[:5]))}); run them, then finalize again")
        tracker = IntegrityTracker(plan.source.units())
        for i in sorted(records):
            tracker.add(records[i].get("s", []))
        engine.verify_inputs(plan, tracker, table.chunk_bytes)
        engine.check_source_unchanged(plan, table.header["source"], where.label)
        receipts = [(c, records[i]["r"]) for i, c in enumerate(chunks)]
        moves = sink.finish(receipts, engine.manifest_for(plan, sink))
        pipeline.hook("finish", where.path)
        staging.commit(moves, overwrite, fsync)
        committed = True
        return engine.Result(dest=where.shown, tensors=len(plan.outputs), bytes_total=plan.total_bytes,
                             bytes_written=plan.total_bytes, chunks_written=len(chunks), chunks_resumed=0,
                             seconds=time.monotonic() - t0, verified_units=len(tracker.verified),
                             dropped=list(plan.dropped), chunk_bytes=table.chunk_bytes, notes=list(plan.notes))
    finally:
        sink.close()
        staging.release(remove=committed)


def _records_by_chunk(staging: Staging, chunks: list[Chunk]) -> dict[int, dict[str, Any]]:
    """The journaled record of each chunk (the first one whose place matches the plan's)."""
    found: dict[int, dict[str, Any]] = {}
    for rec in _share_records(staging, None):
        i = rec.get("i")
        if isinstance(i, int) and 0 <= i < len(chunks) and i not in found \
                and (rec.get("o"), rec.get("n")) == (chunks[i].offset, chunks[i].length):
            found[i] = rec
    return found
