"""Running one conversion's shares on workers: local processes, Dask distributed, or a job array.

A worker gets a ``Job`` (paths and options: a few hundred bytes, never tensor data),
rebuilds the plan from it, checks the plan digest is the coordinator's, and runs one
share (``core/distributed.py``). The coordinator prepares, schedules the shares that
are not finished yet and finalizes; rerunning it redoes no finished share.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

from .core import distributed
from .core.distributed import ShareResult
from .core.engine import Result
from .core.staging import LOCK
from .errors import DestinationError, ResumeError, UsageError, WorkerError
from .progress import ProgressArg
from .progress import start as start_progress


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to rebuild the coordinator's plan and sink: JSON-able."""

    src: str
    dest: str
    to: str | None = None
    step: int | None = None
    sink_options: dict[str, Any] = field(default_factory=dict)
    mapping: dict[str, Any] = field(default_factory=dict)
    max_memory: int = 512 << 20
    fsync: bool = True

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Job:
        return cls(**obj)


def _build(job: Job) -> tuple[Any, Any, Any]:
    """(source, plan, sink) of ``job``, as ``api.convert`` builds them."""
    from .mapping import MappingOptions, build_plan
    from .sinks import require
    from .sources import open_source

    source = open_source(job.src, step=job.step)
    try:
        plan = build_plan(source, MappingOptions.from_mapping(job.mapping))
        sink = _sink(job)
        require(sink.name)
        return source, plan.leave_out(sink.leave_out), sink
    except BaseException:
        source.close()
        raise


def share_task(job: Job, index: int, digest: str) -> ShareResult:
    """Run share ``index`` of ``job`` in this process (what a worker executes).

    Raises: ResumeError if this worker's plan is not the coordinator's (another input or
    another shardconv version at the same path), and whatever ``run_share`` raises."""
    plan = _worker_plan(job)
    if plan.digest() != digest:
        raise ResumeError(f"{job.src}: the plan rebuilt on this worker differs from the coordinator's "
                          "(another input at that path, or another shardconv version); workers must see "
                          "the same files and software")
    return distributed.run_share(plan, _sink(job), job.dest, index, max_memory=job.max_memory, fsync=job.fsync)


#: Per worker thread: the job whose source is open and its plan, kept between its shares
#: (opening a source and planning cost more than a small share's I/O).
_OPEN: dict[int, tuple[str, Any, Any]] = {}


def _worker_plan(job: Job) -> Any:
    """The plan of ``job``, built once per worker thread and job (the source stays open)."""
    import json
    import threading

    key, me = json.dumps(job_record(job), sort_keys=True), threading.get_ident()
    held = _OPEN.get(me)
    if held is not None and held[0] == key:
        return held[2]
    if held is not None:
        held[1].close()
        del _OPEN[me]
    source, plan, _ = _build(job)
    _OPEN[me] = (key, source, plan)
    return plan


def convert(job: Job, *, workers: int | None = None, client: Any = None, overwrite: bool = False,
            restart: bool = False, share_bytes: int | None = None, progress: ProgressArg = False) -> Result:
    """Prepare, run every unfinished share on ``workers`` local processes or a Dask ``client``,
    then finalize. Returns: the Result. Raises: the first share's error (others are cancelled)."""
    t0 = time.monotonic()
    source, plan, sink = _build(job)
    with source:
        table = distributed.prepare(plan, sink, job.dest, max_memory=job.max_memory, overwrite=overwrite,
                                    restart=restart, fsync=job.fsync, share_bytes=share_bytes, job=job_record(job))
        todo = distributed.missing_shares(job.dest)
        digest = plan.digest()
        done_bytes = sum(s.nbytes for s in table.shares if s.index not in set(todo))
        bar = start_progress(progress, plan.total_bytes, done_bytes, os.path.basename(job.dest))
        ran: list[ShareResult] = []
        try:
            run = _on_dask if client is not None else _on_processes
            for result in run(job, todo, digest, client if client is not None else (workers or 1)):
                ran.append(result)
                if bar is not None:
                    bar.update(table.shares[result.index].nbytes)
        finally:
            if bar is not None:
                bar.close()
        final = distributed.finalize(plan, _sink(job), job.dest, overwrite=overwrite, fsync=job.fsync, t0=t0)
    # What this run wrote, and what earlier runs (finished shares, journaled chunks) had.
    written = sum(r.chunks_written for r in ran)
    return dataclasses.replace(final, bytes_written=sum(r.bytes_written for r in ran), chunks_written=written,
                               chunks_resumed=final.chunks_written - written)


def _sink(job: Job) -> Any:
    """A fresh sink of ``job`` (each phase opens and closes its own)."""
    from .sinks import sink_for

    return sink_for(job.dest, job.to, **job.sink_options)


def _on_processes(job: Job, todo: list[int], digest: str, workers: Any) -> Iterable[ShareResult]:
    """Run ``todo`` on a pool of ``workers`` fresh processes; yield each share as it finishes."""
    if int(workers) < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    with ProcessPoolExecutor(max_workers=min(int(workers), max(1, len(todo))),
                             mp_context=get_context("spawn")) as pool:
        pending: set[Future[ShareResult]] = {pool.submit(share_task, job, k, digest) for k in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


def _on_dask(job: Job, todo: list[int], digest: str, client: Any) -> Iterable[ShareResult]:
    """Run ``todo`` as Dask tasks (scheduled dynamically); yield each share as it finishes."""
    from dask.distributed import as_completed

    futures = {client.submit(share_task, job, k, digest, pure=False, key=f"shardconv-share-{k:06d}-{digest[:12]}"): k
               for k in todo}
    try:
        for f in as_completed(list(futures)):
            try:
                yield f.result()
            except Exception as e:
                if type(e).__name__ != "KilledWorker":
                    raise
                raise WorkerError(f"{job.dest}: share {futures[f]} was lost with its worker each time it ran (killed, "
                                  "e.g. over the Dask worker's memory limit: give workers at least --max-memory "
                                  "plus their baseline, or lower --max-memory); rerun to resume") from None
    finally:
        for f in futures:
            f.cancel()


def run_array_task(job: Job, task: int, count: int, *, share_bytes: int | None = None,
                   log: Callable[[str], None] | None = None) -> list[ShareResult]:
    """Job-array entry (``--share I/N``): prepare if nobody has, then run the unfinished shares
    ``k`` with ``k % count == task``. No finalize: ``shardconv finalize`` does that once all
    tasks are done. Returns: what each share did."""
    if not 0 <= task < count:
        raise UsageError(f"--share {task}/{count}: the task number must be in 0..{count - 1}")
    source, plan, sink = _build(job)
    with source:
        _prepare_once(job, plan, sink, share_bytes)
        digest = plan.digest()
    results = []
    for k in distributed.missing_shares(job.dest):
        if k % count == task:
            results.append(share_task(job, k, digest))
            if log:
                log(f"share {k} done")
    return results


#: How long a job-array task waits for another task that is preparing the output.
PREPARE_WAIT_SECONDS = 600.0


def _prepare_once(job: Job, plan: Any, sink: Any, share_bytes: int | None) -> None:
    """Prepare unless a task already has; a task that finds another one preparing waits
    for its share table instead of failing."""
    staging = distributed.Staging(distributed.Destination.parse(job.dest).path)
    if distributed.load_table(staging) is not None:
        return
    try:
        distributed.prepare(plan, sink, job.dest, max_memory=job.max_memory, fsync=job.fsync,
                            share_bytes=share_bytes, job=job_record(job))
    except DestinationError:
        deadline = time.monotonic() + PREPARE_WAIT_SECONDS
        while _lock_held(staging) and time.monotonic() < deadline:
            time.sleep(0.5)
        if distributed.load_table(staging) is None:
            raise


def _lock_held(staging: Any) -> bool:
    """True while another process holds the staging lock (a task preparing)."""
    import fcntl

    try:
        fd = os.open(staging.dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def job_record(job: Job) -> dict[str, Any]:
    """``job`` as JSON-able data (kept in the share table so ``finalize DEST`` needs no SRC)."""
    return asdict(job)


def finalize(dest: str, *, overwrite: bool = False) -> Result:
    """Finalize the prepared output at ``dest`` once every share is done (``shardconv finalize``):
    the plan is rebuilt from the job its share table records.

    Returns: the Result. Raises: ResumeError (nothing prepared there, or shares unfinished)."""
    staging = distributed.Staging(distributed.Destination.parse(dest).path)
    table = distributed.load_table(staging)
    if table is None or table.job is None:
        raise ResumeError(f"{dest}: nothing prepared to finalize (no share table written by a split run)")
    job = Job.from_json(table.job)
    source, plan, sink = _build(job)
    with source:
        return distributed.finalize(plan, sink, job.dest, overwrite=overwrite, fsync=job.fsync, expected=table)


# --------------------------------------------------------------------------- front ends

def job_for(src: Any, dest: str | os.PathLike[str], *, to: str | None, step: int | None,
            sink_options: dict[str, Any] | None, mapping: dict[str, Any], max_memory: int, fsync: bool) -> Job:
    """The Job of an ``api.convert`` call. Raises: UsageError if SRC is not a path (workers
    open the input themselves) or an option cannot travel to a worker."""
    if not isinstance(src, (str, os.PathLike)):
        raise UsageError("a conversion split over workers needs SRC as a path or URL (each worker opens it); "
                         "an in-memory tree converts in this process only")
    mapping = {k: v for k, v in mapping.items() if v is not None}
    rules = mapping.get("rules")
    if isinstance(rules, (str, os.PathLike)):
        mapping["rules"] = os.path.abspath(rules)
    elif rules is not None and not isinstance(rules, list):
        raise UsageError("rules for a split conversion must be a file path or a list of rule dicts")
    options = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in (sink_options or {}).items()}
    return Job(src=_absolute(os.fspath(src)), dest=_absolute(os.fspath(dest)), to=to, step=step,
               sink_options=options, mapping=mapping, max_memory=max_memory, fsync=fsync)


def _absolute(path: str) -> str:
    """A local path made absolute (workers may start elsewhere); an object-store URL as it is."""
    from .formats import tsio

    return path if tsio.is_remote(path) else os.path.abspath(tsio.local_path(path))


def client_for(scheduler: str) -> tuple[Any, Callable[[], None]]:
    """A Dask client for ``--scheduler``: ``tcp://HOST:PORT`` (a running scheduler) or ``local:N``
    (a LocalCluster of N one-thread worker processes started here). Returns: (client, close).
    Raises: MissingDependencyError without dask.distributed; UsageError for a bad address."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("distributed", "dask", "--scheduler") from None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler[6:])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--scheduler {scheduler}: local:N needs a worker count N >= 1")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()
        return client, close
    try:
        client = Client(scheduler, timeout="30s")
    except (OSError, ValueError, TimeoutError) as e:
        raise UsageError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    return client, client.close


def parse_share(text: str) -> tuple[int, int]:
    """``--share I/N`` -> (I, N). Raises: UsageError."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--share {text}: expected I/N, e.g. 0/16 for the first of 16 tasks") from None
    if not 0 <= i < n:
        raise UsageError(f"--share {text}: I must be in 0..N-1")
    return i, n
