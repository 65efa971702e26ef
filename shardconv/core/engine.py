"""Runs a plan into a sink: chunks within the memory budget, a reader thread
overlapping the writer, the journal for resume, and the final atomic commit.

The engine knows no format: sources and sinks plug in through their interfaces.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import (
    BudgetError,
    DestinationError,
    DurabilityError,
    PlanError,
    ResumeError,
    SourceChangedError,
    SourceError,
    UsageError,
)
from ..frontend import changed_options, option
from ..progress import ProgressArg
from ..util import safefs
from ..util.units import format_size
from .budget import MAX_CHUNK, Budget, aligned_empty
from .destination import Destination, SinkContext
from .integrity import IntegrityTracker
from .journal import Journal, boot_id, describe_changes, durable_prefix, is_mark
from .pipeline import hook, start_kill_timer
from .pipeline import run as run_pipeline
from .plan import Chunk, Plan, chunk_plan
from .staging import Staging

if TYPE_CHECKING:  # the contract only; core never imports a sink at run time
    from ..sinks.base import Sink

@dataclass
class Result:
    dest: Path | str
    tensors: int
    bytes_total: int
    bytes_written: int
    chunks_written: int
    chunks_resumed: int
    seconds: float
    verified_units: int
    dropped: list[tuple[str, str]] = field(default_factory=list)
    chunk_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _check_resumable(old: dict[str, Any], new: dict[str, Any], staging: Staging) -> None:
    """Refuse to resume a partial output of other options or another source, naming what changed."""
    problems = []
    if old.get("sink") != new["sink"] or old.get("sink_options") != new["sink_options"]:
        problems += changed_options({"to": old.get("sink"), **(old.get("sink_options") or {})},
                                    {"to": new["sink"], **new["sink_options"]})
    if old.get("source") != new["source"]:
        problems += ["source " + c for c in describe_changes(old.get("source"), new["source"])]
    if old.get("plan") != new["plan"] and not problems:
        problems += changed_options(old.get("options") or {}, new["options"]) if "options" in old else []
        problems += [] if problems else ["the mapping changed"]
    if problems:
        what = "input" if old.get("source") != new["source"] else "options"
        raise ResumeError(f"{staging.dest}: a partial output exists but its {what} changed since it was started "
                          f"({'; '.join(problems[:5])}); rerun with {option('restart')} to start over")


def manifest_for(plan: Plan, sink: Sink) -> dict[str, Any]:
    """The manifest of ``plan`` written by ``sink``: per output its name, dtype, shape, where it
    came from, the source's checksums and dtypes of its inputs. Linear in outputs plus units.

    Returns: a JSON-able dict (sinks copy it, never edit it). Raises: nothing."""
    sums: dict[str, list[tuple[int, str, str]]] = {}  # source tensor -> (unit order, key, checksum)
    for k, (key, u) in enumerate(plan.source.units().items()):
        sums.setdefault(u.tensor, []).append((k, key, f"{u.algorithm}:{u.expected}"))
    dtypes = {t.name: t.dtype for t in plan.source.tensors()}
    tensors = []
    for o in plan.outputs:
        entry = {"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "nbytes": o.nbytes,
                 "from": o.producer.describe()}
        found = sorted(s for name in dict.fromkeys(o.producer.inputs) for s in sums.get(name, ()))
        if found:
            entry["source_checksums"] = {key: value for _, key, value in found}
        entry["source_dtypes"] = {n: dtypes[n] for n in o.producer.inputs if n in dtypes}
        tensors.append(entry)
    return {
        "format": "shardconv-manifest", "version": 1, "shardconv": __version__, "sink": sink.name,
        "source": {"format": plan.source.format, "location": os.path.basename(plan.source.location)},
        "plan": plan.digest(), "options": plan.options,
        "dropped": [{"name": n, "reason": r} for n, r in plan.dropped],
        "tensors": tensors,
    }


@dataclass
class _Job:
    """One conversion between taking the lock and releasing it."""

    plan: Plan
    sink: Sink
    dest: Destination
    staging: Staging
    journal: Journal
    header: dict[str, Any]
    fsync: bool
    journaled: bool = False
    committed: bool = False
    discard: bool = False


@dataclass
class _Opened:
    """What opening the partial output gave: the budget, the chunks, those kept from a resume."""

    budget: Budget
    chunks: list[Chunk]
    tracker: IntegrityTracker
    done: dict[int, dict[str, Any]]


def run(plan: Plan, sink: Sink, dest: str | os.PathLike[str] | Destination, *, max_memory: int,
        overwrite: bool = False, restart: bool = False, fsync: bool = True, progress: ProgressArg = True,
        chunk_bytes: int | None = None) -> Result:
    """Convert ``plan`` into ``sink`` at ``dest``; resumes a partial output of the same run.

    Every refusal that does not depend on a partial output (names the sink cannot hold,
    the budget, the destination's kind, an output over or inside the input) comes before
    the lock: it leaves no ``DEST.partial`` behind.

    Returns: the Result. Raises: PlanError, BudgetError, UsageError and DestinationError before
    anything is written; ResumeError, SourceError, ChecksumError, SourceChangedError,
    DestinationError and DurabilityError while converting (the last two discard the partial)."""
    t0 = time.monotonic()
    start_kill_timer()
    where = Destination.parse(dest)
    scratch = _refuse_before_lock(plan, sink, where, overwrite, max_memory, chunk_bytes)
    where.make_state_dir()
    staging = Staging(where.path)
    staging.acquire()
    job = _Job(plan, sink, where, staging, Journal(staging.journal_path), _header(plan, sink), fsync)
    try:
        hook("lock", where.path)
        if not overwrite and _published(sink, where):  # another run may have published it meanwhile
            raise DestinationError(f"{where.label}: already exists; pass {option('overwrite')} to replace it")
        opened = _open(job, restart, max_memory, chunk_bytes, scratch)
        resumed = sum(opened.chunks[i].length for i in opened.done)
        resumed_chunks = len(opened.done)
        _convert(job, opened, progress, resumed)
        _commit(job, opened, overwrite)
        return Result(dest=where.shown, tensors=len(plan.outputs), bytes_total=plan.total_bytes,
                      bytes_written=plan.total_bytes - resumed, chunks_written=len(opened.chunks) - resumed_chunks,
                      chunks_resumed=resumed_chunks, seconds=time.monotonic() - t0,
                      verified_units=len(opened.tracker.verified), dropped=list(plan.dropped),
                      chunk_bytes=opened.budget.chunk_bytes, notes=list(plan.notes))
    except (DurabilityError, SourceChangedError):
        job.discard = True  # after a failed fsync nothing written is trusted; a changed source's chunks never are
        raise
    finally:
        try:
            job.journal.close()
            sink.close()
        finally:  # the lock is released even if closing failed
            staging.release(remove=job.committed or job.discard or (staging.created and not job.journaled))


def _header(plan: Plan, sink: Sink) -> dict[str, Any]:
    """What a journal records of a run, and a resume must find unchanged."""
    return {"sink": sink.name, "sink_options": sink.options(), "source": plan.source.fingerprint(),
            "plan": plan.digest(), "options": plan.options}


def _refuse_before_lock(plan: Plan, sink: Sink, where: Destination, overwrite: bool, max_memory: int,
                        chunk_bytes: int | None) -> int:
    """Every refusal that needs no lock: names the sink cannot hold, a URL for a local-only
    sink, the budget, the destination. Returns: the scratch slots. Raises: PlanError,
    UsageError, BudgetError, DestinationError."""
    problems = sink.check_outputs(plan.outputs)
    if problems:
        raise PlanError(problems, where=where.given)
    if where.is_url and not sink.capabilities.remote:
        raise UsageError(f"{where.url}: the {sink.name} output (with these options) is written to a local path "
                         "only; write it there and copy it to the object store")
    scratch = _scratch_slots(plan, sink)
    budget = Budget.for_limit(max_memory, chunk_bytes, scratch_factor=scratch, reserve=plan.source.budget_reserve())
    _check_grid(plan, sink, budget, scratch)
    check_destination(plan, sink, where, overwrite)
    return scratch


def _check_grid(plan: Plan, sink: Sink, budget: Budget, scratch: int) -> None:
    """Refuse a budget whose chunks cannot hold one whole cell of the sink's chunk grid: cutting
    a cell would make the output's bytes depend on the budget. Raises: BudgetError."""
    need, why = sink.min_chunk_bytes(plan.outputs)
    if need <= budget.chunk_bytes:
        return
    if need > MAX_CHUNK:
        raise BudgetError(f"{why} are larger than the largest chunk shardconv holds at once "
                          f"({format_size(MAX_CHUNK)}); choose smaller chunks")
    least = Budget.limit_for(need, scratch, plan.source.budget_reserve())
    raise BudgetError(f"{option('max_memory', format_size(budget.max_memory))} is too small for {why}: "
                      f"at least {format_size(least)} is needed, or choose smaller chunks")


def _published(sink: Sink, where: Destination) -> bool:
    """True if a finished output is at ``where``. On an object store, a journal of ours in the
    state directory means the run there is unfinished (no rename publishes it): resume it."""
    if where.is_url and safefs.lstat(Staging(where.path).journal_path) is not None:
        return False
    return sink.exists(where)


def _open(job: _Job, restart: bool, max_memory: int, chunk_bytes: int | None, scratch: int) -> _Opened:
    """Continue the journaled run (attach, keep its intact chunks) or start afresh (prepare)."""
    prior = _prior_run(job.journal, job.staging, job.header, restart)
    recorded = prior[0].get("chunk_bytes") if prior else None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        chunk_bytes = recorded  # the same chunks as the journaled run (a resume keeps them)
    budget = Budget.for_limit(max_memory, chunk_bytes, scratch_factor=scratch,
                              reserve=job.plan.source.budget_reserve())
    resume = prior is not None and safefs.lstat(job.staging.out) is not None
    ctx = SinkContext(job.dest, durable=job.fsync, chunk_bytes=budget.chunk_bytes, resume=resume,
                      source=job.plan.source)
    job.sink.open(job.staging.out, job.plan.outputs, ctx)
    chunks = chunk_plan(job.plan.outputs, budget.chunk_bytes, job.sink.chunk_grid)
    tracker = IntegrityTracker(job.plan.source.units())
    boot = boot_id()
    same_boot = bool(prior and boot and prior[0].get("boot") == boot)
    done, trusted = _kept_chunks(prior[1], chunks, job.sink, tracker, same_boot) if resume and prior else ({}, 0)
    kept = list(done.values())  # the durable ones first, still vouched for by their mark
    job.journal.start({**job.header, "chunk_bytes": budget.chunk_bytes, "dest": job.dest.path.name, "boot": boot},
                      kept[:trusted] + ([{"d": trusted}] if trusted else []) + kept[trusted:], durable=job.fsync)
    job.journaled = True
    return _Opened(budget, chunks, tracker, done)


def _convert(job: _Job, opened: _Opened, progress: ProgressArg, resumed: int) -> None:
    """Write every chunk not kept, then check what the reads did not: the inputs' remaining
    checksums, and that the source did not change meanwhile."""
    todo = [(i, c) for i, c in enumerate(opened.chunks) if i not in opened.done]
    try:
        run_pipeline(job.plan, job.sink, job.journal, opened.tracker, todo, opened.done, opened.budget, progress,
                     job.plan.total_bytes, resumed, job.dest.path.name, durable=job.fsync)
        verify_inputs(job.plan, opened.tracker, opened.budget.chunk_bytes)
    except SourceError as e:
        # A file cut short or bytes that no longer decode may be an input rewritten under the run
        # (a training job saving over it): then that is what the user needs to hear.
        if not isinstance(e, SourceChangedError):
            check_source_unchanged(job.plan, job.header["source"], job.dest.label, cause=e)
        raise
    check_source_unchanged(job.plan, job.header["source"], job.dest.label)


def _commit(job: _Job, opened: _Opened, overwrite: bool) -> None:
    """Finish the output and publish it (atomic renames)."""
    receipts = [(c, opened.done[i]["r"]) for i, c in enumerate(opened.chunks)]
    moves = job.sink.finish(receipts, manifest_for(job.plan, job.sink))
    job.journal.close()
    hook("finish", job.dest.path)
    job.staging.commit(moves, overwrite, job.fsync)
    job.committed = True
    hook("renamed")


def _scratch_slots(plan: Plan, sink: Sink) -> int:
    """Chunk-sized scratch buffers the plan's producers and the sink need beside the pool."""
    unit = 1 << 20
    return max([-(-o.producer.scratch_bytes(unit) // unit) for o in plan.outputs] + [0]) + 1 + sink.scratch_slots()


def _prior_run(journal: Journal, staging: Staging, header: dict[str, Any],
               restart: bool) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The journal of a partial output this run continues, or None (leftovers discarded)."""
    if restart:
        staging.reset()
        return None
    prior = journal.load()
    if prior is None:
        if staging.has_leftovers():
            staging.reset()  # leftovers without a journal: nothing to resume
        return None
    _check_resumable(prior[0], header, staging)
    return prior


def _kept_chunks(records: list[dict[str, Any]], chunks: list[Chunk], sink: Sink, tracker: IntegrityTracker,
                 same_boot: bool = False, within: range | None = None,
                 done: dict[int, dict[str, Any]] | None = None) -> tuple[dict[int, dict[str, Any]], int]:
    """Journaled chunks of an earlier run that are intact in the partial output, by index (in
    journal order), and how many of them come first as durable. Kept as journaled, unread:
    every chunk if the journal was written on this boot of the machine (a killed process loses
    nothing it wrote), else those before the last durable mark (synced before the mark was
    written); any other chunk only if ``sink.check`` finds its bytes.

    ``within``: only chunks of this range are kept (a share's). ``done``: chunks kept from
    another journal already, added to (not kept again)."""
    trusted = durable_prefix(records)
    kept_trusted = 0
    done = {} if done is None else done
    within = range(len(chunks)) if within is None else within
    for n, rec in enumerate(r for r in records if not is_mark(r)):
        i = rec.get("i")
        if not isinstance(i, int) or not 0 <= i < len(chunks) or i not in within or i in done:
            continue
        c = chunks[i]
        if (rec.get("o"), rec.get("n")) != (c.offset, c.length):
            continue
        if n >= trusted and not same_boot and not sink.check(c, rec.get("r")):
            continue
        done[i] = rec
        kept_trusted += n < trusted
        tracker.add(rec.get("s", []))
    return done, kept_trusted


def check_destination(plan: Plan, sink: Sink, dest: Destination, overwrite: bool) -> None:
    """Refuse, before anything is written: an output over, around or inside the input; an
    existing output without ``overwrite``; with it, one of another kind (a file where a
    directory goes, or the reverse). A symbolic link at DEST is replaced as a link: its
    target is never followed, written or removed.

    Returns: None. Raises: DestinationError."""
    finals = sink.final_paths(dest.path)
    _check_apart_from_input(plan, [*finals, Staging(dest.path).dir], dest.label)
    if not overwrite:
        if _published(sink, dest):
            raise DestinationError(f"{dest.label}: already exists; pass {option('overwrite')} to replace it")
        return
    if dest.is_url:
        return
    for k, path in enumerate(finals):
        want = sink.output_kind if k == len(finals) - 1 else "file"
        have = safefs.kind(safefs.lstat(path))
        if os.path.lexists(path.parent) and not path.parent.is_dir():
            have = f"path below a {safefs.kind(safefs.lstat(path.parent))}"
        elif have in ("missing", "link", want):
            continue
        raise DestinationError(f"{path}: is a {have}, and the {sink.name} output is a {want}; {option('overwrite')} "
                               "replaces an output of the same kind only (remove it or choose another destination)")


def _check_apart_from_input(plan: Plan, writes: list[Path], label: str) -> None:
    """No path the run writes, replaces or removes may be an input file, hold one, or lie
    inside the input's directory (both sides resolved through symbolic links)."""
    inputs = [os.path.realpath(f) for f in plan.source.input_files()]
    loc = plan.source.location
    root = os.path.realpath(loc) if isinstance(loc, str) and os.path.lexists(loc) else None
    for w in map(safefs.where_written, writes):
        for i in inputs + ([root] if root else []):
            if not safefs.outside(i, w):
                what = "is the input" if i == w else f"would hold the input {i}"
                raise DestinationError(f"{label}: {what} (writing there would replace it); choose a destination "
                                       "apart from the input")
        if root and os.path.isdir(root) and not safefs.outside(w, root):
            raise DestinationError(f"{label}: is inside the input {root} (writing there would change it); choose a "
                                   "destination outside it")


def check_source_unchanged(plan: Plan, recorded: dict[str, Any], label: str, cause: SourceError | None = None) -> None:
    """Once every byte has been read (or a read failed: ``cause``), the source must still be
    what it was at the start. Raises: SourceChangedError, after ``cause``'s message if given."""
    try:
        now = plan.source.fingerprint()
    except (SourceError, OSError):
        if cause is None:
            raise
        return  # the input is gone or unreadable now: the read's own error says enough
    if now != recorded:
        changes = describe_changes(recorded, now)
        what = f"{cause}; " if cause is not None else f"{plan.source.location}: "
        raise SourceChangedError(f"{what}the input changed while it was being converted "
                                 f"({'; '.join(changes[:5]) or 'fingerprint differs'}); nothing was written to "
                                 f"{label}: rerun to convert it as it is now") from cause


#: RSS of the interpreter with numpy and shardconv loaded, measured (bench/run.py "import shardconv").
BASELINE_RSS = 40 << 20


def memory_estimate(plan: Plan, sink: Sink, max_memory: int) -> dict[str, int]:
    """What a conversion of ``plan`` into ``sink`` will hold at its peak, by part."""
    scratch = _scratch_slots(plan, sink)
    reserve = plan.source.budget_reserve()
    budget = Budget.for_limit(max_memory, scratch_factor=scratch, reserve=reserve)
    est = {"chunk_bytes": budget.chunk_bytes, "buffers": budget.n_buffers * budget.buffer_bytes,
           "scratch": scratch * budget.chunk_bytes, "baseline": BASELINE_RSS + plan.source.baseline_bytes() + sink.baseline_bytes(),
           "source_held": reserve[0]}
    # Source scratch (partitioned reads) is rarely all live at once; buffers are touched in full.
    est["peak"] = est["baseline"] + est["buffers"] + (scratch - 1) * budget.chunk_bytes + reserve[0]
    return est


def verify_inputs(plan: Plan, tracker: IntegrityTracker, chunk_bytes: int) -> None:
    """Check the checksums the conversion's reads did not cover (inputs read in many
    small runs, e.g. transposed) with one sequential pass over those tensors."""
    inputs = {name for o in plan.outputs for name in o.producer.inputs}
    pending = sorted({u.tensor for k, u in tracker.units.items() if u.tensor in inputs and k not in tracker.verified})
    if not pending:
        return
    buf = aligned_empty(chunk_bytes)
    for name in pending:
        info = plan.source.info(name)
        tracker.reset(name)
        for off in range(0, info.nbytes, chunk_bytes):
            n = min(chunk_bytes, info.nbytes - off)
            tracker.add(plan.source.read_into(name, off, buf[:n]))
