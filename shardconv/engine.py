"""Runs a plan into a sink: chunks within the memory budget, a reader thread
overlapping the writer, the journal for resume, and the final atomic commit.

The engine knows no format: sources and sinks plug in through their interfaces.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .budget import Budget, BufferPool
from .errors import DestinationError, DurabilityError, ResumeError
from .integrity import IntegrityTracker
from .journal import Journal, describe_changes
from .plan import Chunk, Plan, chunk_plan
from .sinks.base import Sink
from .staging import Staging

#: Test hook: SHARDCONV_TEST_KILL=chunk:K | journal:K | finish | renamed kills the
#: process with SIGKILL at that point, for the resume tests; after:SECONDS kills it that
#: long after the conversion starts, wherever it then is.
_KILL = os.environ.get("SHARDCONV_TEST_KILL", "")


def _hook(point: str) -> None:
    if _KILL and _KILL == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _start_kill_timer() -> None:
    if _KILL.startswith("after:"):
        t = threading.Timer(float(_KILL[6:]), os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()


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
    problems = []
    if old.get("sink") != new["sink"] or old.get("sink_options") != new["sink_options"]:
        problems += describe_changes({"format": old.get("sink"), **(old.get("sink_options") or {})},
                                     {"format": new["sink"], **new["sink_options"]})
    if old.get("source") != new["source"]:
        problems += ["source " + c for c in describe_changes(old.get("source"), new["source"])]
    if old.get("plan") != new["plan"] and not problems:
        problems.append("the mapping or options changed")
    if problems:
        raise ResumeError(f"{staging.dest}: a partial output exists but its input changed since it was started "
                          f"({'; '.join(problems[:5])}); rerun with --restart to start over")


def manifest_for(plan: Plan, sink: Sink) -> dict[str, Any]:
    units = plan.source.units()
    dtypes = {t.name: t.dtype for t in plan.source.tensors()}
    tensors = []
    for o in plan.outputs:
        entry = {"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "nbytes": o.nbytes,
                 "from": o.producer.describe()}
        sums = {k: f"{u.algorithm}:{u.expected}" for k, u in units.items() if u.tensor in o.producer.inputs}
        if sums:
            entry["source_checksums"] = sums
        entry["source_dtypes"] = {n: dtypes[n] for n in o.producer.inputs if n in dtypes}
        tensors.append(entry)
    return {
        "format": "shardconv-manifest", "version": 1, "shardconv": __version__, "sink": sink.name,
        "source": {"format": plan.source.format, "location": os.path.basename(plan.source.location)},
        "plan": plan.digest(), "options": plan.options,
        "dropped": [{"name": n, "reason": r} for n, r in plan.dropped],
        "tensors": tensors,
    }


def run(plan: Plan, sink: Sink, dest: str | os.PathLike, *, max_memory: int, overwrite: bool = False,
        restart: bool = False, fsync: bool = True, progress: bool = True,
        chunk_bytes: int | None = None) -> Result:
    """Convert ``plan`` into ``sink`` at ``dest``; resumes a partial output of the same run."""
    t0 = time.monotonic()
    _start_kill_timer()
    shown = str(dest) if "://" in str(dest) else None  # URLs are reported as given
    dest = sink.local_dest(dest)
    if sink.exists(dest) and not overwrite:
        raise DestinationError(f"{shown or dest}: already exists; pass --overwrite to replace it")
    staging = Staging(dest)
    staging.acquire()
    committed = False
    try:
        journal = Journal(staging.journal_path)
        header = {"sink": sink.name, "sink_options": sink.options(), "source": plan.source.fingerprint(),
                  "plan": plan.digest()}
        prior = None
        if restart:
            staging.reset()
        else:
            prior = journal.load()
            if prior is None and any(p.name != "lock" for p in staging.dir.iterdir()):
                staging.reset()  # leftovers without a journal: nothing to resume
        if prior:
            _check_resumable(prior[0], header, staging)
            chunk_bytes = int(prior[0]["chunk_bytes"])
        unit = 1 << 20
        scratch = max([-(-o.producer.scratch_bytes(unit) // unit) for o in plan.outputs] + [0]) + 1 + sink.scratch_slots()
        budget = Budget.for_limit(max_memory, chunk_bytes, scratch_factor=scratch)
        resume = bool(prior) and staging.out.exists()
        sink.durable = fsync
        sink.chunk_bytes = budget.chunk_bytes
        sink.open(staging.out, plan.outputs, resume=resume)
        chunks = chunk_plan(plan.outputs, budget.chunk_bytes, sink.row_multiple)

        tracker = IntegrityTracker(plan.source.units())
        done: dict[int, dict[str, Any]] = {}
        if resume:
            for rec in prior[1]:
                i = rec.get("i")
                if not isinstance(i, int) or not 0 <= i < len(chunks) or i in done:
                    continue
                c = chunks[i]
                if (rec.get("o"), rec.get("n")) != (c.offset, c.length) or not sink.check(c, rec.get("r")):
                    continue
                done[i] = rec
                tracker.add(rec.get("s", []))
        journal.start({**header, "chunk_bytes": budget.chunk_bytes, "dest": dest.name}, [done[i] for i in sorted(done)],
                      durable=fsync)

        todo = [(i, c) for i, c in enumerate(chunks) if i not in done]
        total = plan.total_bytes
        resumed_bytes = sum(chunks[i].length for i in done)
        resumed_chunks = len(done)
        _pipeline(plan, sink, journal, tracker, todo, done, budget, progress, total, resumed_bytes, dest.name)
        verify_inputs(plan, tracker, budget.chunk_bytes)

        receipts = [(chunks[i], done[i]["r"]) for i in range(len(chunks))]
        moves = sink.finish(receipts, manifest_for(plan, sink), fsync, dest)
        journal.close()
        _hook("finish")
        staging.commit(moves, overwrite, fsync)
        committed = True
        _hook("renamed")
        return Result(shown or dest, len(plan.outputs), total, total - resumed_bytes, len(todo), resumed_chunks,
                      time.monotonic() - t0, len(tracker.verified), list(plan.dropped), budget.chunk_bytes,
                      list(plan.notes))
    except DurabilityError:
        sink.close()
        staging.reset()  # after a failed fsync nothing written is trusted
        raise
    finally:
        sink.close()
        staging.release(remove=committed)


#: RSS of the interpreter with numpy and shardconv loaded, measured (bench/run.py "import shardconv").
BASELINE_RSS = 40 << 20


def memory_estimate(plan: Plan, sink: Sink, max_memory: int) -> dict[str, int]:
    """What a conversion of ``plan`` into ``sink`` will hold at its peak, by part."""
    unit = 1 << 20
    scratch = max([-(-o.producer.scratch_bytes(unit) // unit) for o in plan.outputs] + [0]) + 1 + sink.scratch_slots()
    budget = Budget.for_limit(max_memory, scratch_factor=scratch)
    est = {"chunk_bytes": budget.chunk_bytes, "buffers": budget.n_buffers * budget.chunk_bytes,
           "scratch": scratch * budget.chunk_bytes, "baseline": BASELINE_RSS + plan.source.baseline_bytes() + sink.baseline_bytes()}
    # Source scratch (partitioned reads) is rarely all live at once; buffers are touched in full.
    est["peak"] = est["baseline"] + est["buffers"] + (scratch - 1) * budget.chunk_bytes
    return est


def verify_inputs(plan: Plan, tracker: IntegrityTracker, chunk_bytes: int) -> None:
    """Check the checksums the conversion's reads did not cover (inputs read in many
    small runs, e.g. transposed) with one sequential pass over those tensors."""
    inputs = {name for o in plan.outputs for name in o.producer.inputs}
    pending = sorted({u.tensor for k, u in tracker.units.items() if u.tensor in inputs and k not in tracker.verified})
    if not pending:
        return
    buf = np.empty(chunk_bytes, np.uint8)
    for name in pending:
        info = plan.source.info(name)
        tracker.reset(name)
        for off in range(0, info.nbytes, chunk_bytes):
            n = min(chunk_bytes, info.nbytes - off)
            tracker.add(plan.source.read_into(name, off, memoryview(buf)[:n]))


def _pipeline(plan: Plan, sink: Sink, journal: Journal, tracker: IntegrityTracker, todo: list[tuple[int, Chunk]],
              done: dict[int, dict[str, Any]], budget: Budget, progress: bool, total: int, initial: int,
              label: str) -> None:
    """One reader thread fills pooled buffers; this thread writes and journals them in order."""
    pool = BufferPool(budget.n_buffers, budget.chunk_bytes)
    filled: queue.Queue = queue.Queue()
    stop = threading.Event()
    source = plan.source

    def read(name: str, offset: int, out: memoryview):
        return source.read_into(name, offset, out)

    def reader() -> None:
        try:
            for i, c in todo:
                while True:
                    if stop.is_set():
                        return
                    try:
                        buf = pool.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                view = memoryview(buf)[: c.length]
                segs = plan.outputs[c.index].producer.fill(c.offset, view, read) if c.length else []
                filled.put((i, c, buf, segs))
            filled.put(None)
        except BaseException as e:  # handed to the writer, which raises it
            filled.put(e)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=label, dynamic_ncols=True, leave=True)
    thread = threading.Thread(target=reader, name="shardconv-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = filled.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            i, c, buf, segs = item
            receipt = sink.write(c, memoryview(buf)[: c.length])
            tracker.add(segs)
            rec = {"i": i, "o": c.offset, "n": c.length, "r": receipt, "s": [list(s) for s in segs]}
            _hook(f"chunk:{i}")
            journal.append(rec)
            _hook(f"journal:{i}")
            done[i] = rec
            pool.put(buf)
            if bar is not None:
                bar.update(c.length)
    finally:
        stop.set()
        thread.join()
        if bar is not None:
            bar.close()
