"""One conversion split over workers (core/distributed.py, workers.py): byte-identical to a
single-process run, resumable per share, idempotent, and an error in any share ends the run
with one line and nothing at DEST."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from procs import tree_digest

from shardconv import api
from shardconv.core import distributed
from shardconv.core.destination import Destination
from shardconv.core.staging import Staging
from shardconv.errors import ChecksumError, ResumeError
from shardconv.testing.sink_suite import BEFORE_RESTART, write_reference_npz
from shardconv.workers import Job, convert, run_array_task, share_task

BUDGET = 8 << 20          # small chunks: many of them
SHARE = 3 << 20           # several shares for the ~14 MiB tree below
ZARR = {"chunk_mib": 0.25}  # whole Zarr chunks fit BUDGET's chunks (the grid never follows the budget)


def _tree() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(16)
    return {
        "big/kernel": rng.standard_normal((1024, 2048)).astype(np.float32),     # 8 MiB: spans shares
        "mid/kernel": rng.standard_normal((512, 1024)).astype(np.float32),
        "small/bias": np.arange(10, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "scalar": np.array(3.5, np.float64),
        "half": rng.standard_normal((300, 700)).astype(np.float16),
    }


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src.npz"
    write_reference_npz(path, _tree())
    return path


def _job(src: Path, dest: Path | str, **kw) -> Job:
    return Job(src=str(src), dest=str(dest), max_memory=BUDGET, **kw)


def _single(src: Path, dest: Path, **kw) -> dict[str, bytes]:
    api.convert(src, dest, max_memory=BUDGET, **kw)
    return _digest(dest)


def _digest(dest: Path) -> dict[str, bytes]:
    """The output and its sidecar, by name relative to DEST's directory."""
    out = tree_digest(dest)
    for p in dest.parent.iterdir():
        if p.name.startswith(dest.name) and p != dest and not p.name.endswith(".partial"):
            out.update(tree_digest(p))
    return {k.replace(dest.name, "DEST", 1): v for k, v in out.items()}


def _prepared(src: Path, dest: Path, **kw):
    job = _job(src, dest, **kw)
    from shardconv.workers import _build

    source, plan, sink = _build(job)
    with source:
        table = distributed.prepare(plan, sink, dest, max_memory=BUDGET, share_bytes=SHARE)
    return job, plan, table


@pytest.mark.parametrize("to,options", [("npz", {}), ("npz", {"max_file_size": "4MiB"}), ("zarr", ZARR)],
                         ids=["npz", "split-npz", "zarr"])
def test_two_workers_write_the_bytes_one_process_writes(src, tmp_path, to, options):
    want = _single(src, tmp_path / "one" / f"out.{to}", to=to, sink_options=options)
    dest = tmp_path / "two" / f"out.{to}"
    dest.parent.mkdir()
    result = convert(_job(src, dest, to=to, sink_options=options), workers=2, share_bytes=SHARE)
    assert _digest(dest) == want
    assert result.bytes_total == sum(a.nbytes for a in _tree().values())
    assert not (tmp_path / "two" / f"out.{to}.partial").exists()


def test_shares_are_independent_of_the_worker_count_and_cover_every_chunk(src, tmp_path):
    _, plan, table = _prepared(src, tmp_path / "a.npz")
    _, _, again = _prepared(src, tmp_path / "b.npz")
    assert [(s.start, s.stop) for s in table.shares] == [(s.start, s.stop) for s in again.shares]
    assert len(table.shares) >= 4
    assert table.shares[0].start == 0 and all(a.stop == b.start for a, b in zip(table.shares, table.shares[1:]))
    assert sum(s.nbytes for s in table.shares) == plan.total_bytes


def _kill_worker(job: Job, plan, share, point: str, env: dict[str, str] | None = None) -> None:
    """Run ``share`` in a worker process killed at test hook ``point``."""
    code = ("import sys, json; from shardconv.workers import Job, share_task; "
            "share_task(Job.from_json(json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3])")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(job.__dict__), str(share.index), plan.digest()],
                       env={**os.environ, "SHARDCONV_TEST_KILL": point, **(env or {})}, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr


def _rerun_counting_checks(job: Job, plan, share, monkeypatch) -> tuple[list[int], object]:
    """Rerun ``share`` in this process; the chunks it read back from the output, by offset."""
    from shardconv.sinks.npz import NpzSink

    checked: list[int] = []
    real_check = NpzSink.check
    monkeypatch.setattr(NpzSink, "check", lambda self, c, r: (checked.append(c.offset), real_check(self, c, r))[1])
    return checked, share_task(job, share.index, plan.digest())


def test_a_worker_killed_mid_share_resumes_from_its_journal(src, tmp_path, monkeypatch):
    """Killed and rerun on the same boot of the machine, as engine.run: every journaled chunk
    is kept without reading it back (the killed process lost nothing it wrote)."""
    dest = tmp_path / "out.npz"
    job, plan, table = _prepared(src, dest)
    share = max(table.shares, key=len)
    kill_at = share.start + len(share) // 2
    _kill_worker(job, plan, share, f"journal:{kill_at}")
    checked, again = _rerun_counting_checks(job, plan, share, monkeypatch)
    assert again.chunks_resumed == kill_at - share.start + 1 and again.chunks_written == share.stop - kill_at - 1
    assert checked == []
    convert(job, workers=1)
    assert _digest(dest) == _single(src, tmp_path / "ref" / "out.npz")


def test_a_share_resumed_after_a_restart_reads_back_only_what_no_durable_mark_vouches_for(src, tmp_path, monkeypatch):
    """A share journal from another boot: the chunks before its last durable mark (synced
    before the mark) are kept unread, every later one is read back; the rerun's journal puts
    the vouched-for records under a mark of its own, so a second restart trusts them too."""
    dest = tmp_path / "out.npz"
    job, plan, table = _prepared(src, dest)
    share = max(table.shares, key=len)
    assert len(share) >= 4
    _kill_worker(job, plan, share, "mark:1", {"SHARDCONV_TEST_MARK_BYTES": "1", **BEFORE_RESTART})
    (journal,) = (Staging(dest).dir / distributed.JOURNALS).glob(f"{share.index:06d}-*.jsonl")
    records = [json.loads(line) for line in journal.read_bytes().splitlines()[1:] if line.strip()]
    marks = [r["d"] for r in records if "d" in r]
    journaled = sum("i" in r for r in records)
    assert len(marks) == 1 and 0 < marks[-1] <= journaled, records
    checked, again = _rerun_counting_checks(job, plan, share, monkeypatch)
    assert again.chunks_resumed == journaled and len(checked) == journaled - marks[-1]
    rerun = [p for p in journal.parent.glob(f"{share.index:06d}-*.jsonl") if p != journal]
    head = [json.loads(line) for line in rerun[0].read_bytes().splitlines()[1:marks[-1] + 2]]
    assert [r.get("i", r) for r in head] == list(range(share.start, share.start + marks[-1])) + [{"d": marks[-1]}]
    convert(job, workers=1)
    assert _digest(dest) == _single(src, tmp_path / "ref" / "out.npz")


def test_a_rerun_coordinator_redoes_no_finished_share(src, tmp_path):
    dest = tmp_path / "out.npz"
    job = _job(src, dest)
    first = run_array_task(job, 0, 2, share_bytes=SHARE)            # half the shares, then "killed"
    assert first and all(r.index % 2 == 0 for r in first)
    left = distributed.missing_shares(dest)
    assert left and all(k % 2 == 1 for k in left)
    journals_before = set(os.listdir(Staging(Destination.parse(dest).path).dir / distributed.JOURNALS))
    convert(job, workers=2, share_bytes=SHARE)
    assert _digest(dest) == _single(src, tmp_path / "ref" / "out.npz")
    # the coordinator's rerun started one attempt per unfinished share only
    assert all(int(name[:6]) % 2 == 0 for name in journals_before)


def test_the_same_share_run_twice_at_once_gives_the_same_output(src, tmp_path):
    dest = tmp_path / "out.npz"
    job, plan, table = _prepared(src, dest)
    code = ("import sys, json; from shardconv.workers import Job, share_task; "
            "share_task(Job.from_json(json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3])")
    args = [json.dumps(job.__dict__), str(max(table.shares, key=len).index), plan.digest()]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    convert(job, workers=2)
    assert _digest(dest) == _single(src, tmp_path / "ref" / "out.npz")


def test_job_array_tasks_then_finalize(src, tmp_path):
    dest = tmp_path / "out.zarr"
    job = _job(src, dest, to="zarr", sink_options=ZARR)
    for task in (1, 0, 2):
        run_array_task(job, task, 3, share_bytes=SHARE)
    with pytest.raises(ResumeError):
        share_task(job, 10_000, "x" * 64)
    from shardconv.workers import finalize

    finalize(str(dest))                   # from the job the share table records: no SRC needed
    assert _digest(dest) == _single(src, tmp_path / "ref" / "out.zarr", to="zarr", sink_options=ZARR)


def test_finalize_refuses_while_a_share_is_unfinished(src, tmp_path):
    dest = tmp_path / "out.npz"
    job, plan, table = _prepared(src, dest)
    share_task(job, 0, plan.digest())
    from shardconv.workers import _build

    source, plan, sink = _build(job)
    with source, pytest.raises(ResumeError, match=r"shares are not finished \(first: 1"):
        distributed.finalize(plan, sink, dest)
    assert not dest.exists()


def test_a_corrupt_byte_in_one_share_ends_the_run_naming_file_and_tensor(src, tmp_path):
    import zipfile

    with zipfile.ZipFile(src) as z:
        info = z.getinfo("mid/kernel.npy")
    with open(src, "r+b") as f:     # a byte well inside mid/kernel's data (past the npy header)
        f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + 4096)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    dest = tmp_path / "out.npz"
    with pytest.raises(ChecksumError, match=r"mid/kernel") as e:
        convert(_job(src, dest), workers=2, share_bytes=SHARE)
    assert "\n" not in str(e.value) and str(src) in str(e.value)
    assert not dest.exists()


def test_a_worker_with_another_plan_is_refused(src, tmp_path):
    dest = tmp_path / "out.npz"
    job, plan, _ = _prepared(src, dest)
    with pytest.raises(ResumeError, match="differs from the coordinator"):
        share_task(job, 0, "0" * 64)
    other = Job(**{**job.__dict__, "mapping": {"exclude": "small/*"}})
    with pytest.raises(ResumeError):
        share_task(other, 0, api.make_plan(api.open_source(src), exclude="small/*").digest())


@pytest.fixture(scope="session")
def dask_client():
    distributed_mod = pytest.importorskip("dask.distributed")
    cluster = distributed_mod.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                                           processes=True)
    client = distributed_mod.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.parametrize("to", ["npz", "zarr"])
def test_dask_workers_write_the_bytes_one_process_writes(src, tmp_path, dask_client, to):
    dest = tmp_path / f"out.{to}"
    options = ZARR if to == "zarr" else {}
    convert(_job(src, dest, to=to, sink_options=options), client=dask_client, share_bytes=SHARE)
    assert _digest(dest) == _single(src, tmp_path / "ref" / f"out.{to}", to=to, sink_options=options)
    workers = {w["id"] for w in dask_client.scheduler_info()["workers"].values()}
    assert len(workers) == 2


def test_zarr_on_s3_from_two_workers_equals_one_process(src, tmp_path, s3, monkeypatch):
    from conftest import s3_objects

    monkeypatch.setenv("SHARDCONV_STATE_DIR", str(tmp_path / "state"))
    api.convert(src, "s3://shardconv-test/one/m.zarr", max_memory=BUDGET, sink_options=ZARR)
    convert(_job(src, "s3://shardconv-test/two/m.zarr", to="zarr", sink_options=ZARR), workers=2, share_bytes=SHARE)
    one, two = s3_objects("one/m.zarr/"), s3_objects("two/m.zarr/")
    assert one and one == two
    assert not list((tmp_path / "state").rglob("*.jsonl"))   # share journals released with the state


def _cluster(memory_limit: int):
    import dask
    from dask.distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                               memory_limit=memory_limit)
    return cluster, Client(cluster)


def _worker_rss(client) -> int:
    """The worker's RSS once it has imported what a share needs (its baseline)."""
    def load() -> int:
        import psutil

        import shardconv.workers  # noqa: F401
        from shardconv.sinks import npz  # noqa: F401
        from shardconv.sources import npz as npz_source  # noqa: F401

        return psutil.Process().memory_info().rss
    return max(client.run(load).values())


def _baseline() -> int:
    """A fresh worker's RSS with what a share imports loaded (Dask's own baseline included)."""
    cluster, client = _cluster(1 << 30)
    try:
        return _worker_rss(client)
    finally:
        client.close()
        cluster.close()


class _PeakSampler:
    """Peak RSS of the given worker processes, sampled from outside (other clusters' workers,
    also children of this process, are not counted)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self):
        import threading

        import psutil

        self.peak, self._stop = 0, threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                for pid in self.pids:
                    try:
                        self.peak = max(self.peak, psutil.Process(pid).memory_info().rss)
                    except psutil.Error:
                        pass
                self._stop.wait(0.005)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture
def big_src(tmp_path: Path) -> Path:
    path = tmp_path / "big.npz"
    rng = np.random.default_rng(7)
    write_reference_npz(path, {"w": rng.standard_normal((128, 1 << 18)).astype(np.float32)})  # 128 MiB
    return path


#: A cast: every chunk goes through the pooled buffers (a verbatim copy touches only a small part of them).
BUFFERED = {"dtype": "float16"}


def test_an_in_budget_worker_under_a_memory_limit_of_budget_plus_baseline_is_never_killed(big_src, tmp_path):
    budget = 32 << 20
    baseline = _baseline()
    cluster, client = _cluster(budget + baseline)
    try:
        _worker_rss(client)
        with _PeakSampler(list(client.run(os.getpid).values())) as rss:
            convert(Job(src=str(big_src), dest=str(tmp_path / "out.npz"), mapping=BUFFERED, max_memory=budget),
                    client=client, share_bytes=32 << 20)
        assert rss.peak <= budget + baseline, (rss.peak >> 20, baseline >> 20)
    finally:
        client.close()
        cluster.close()
    with np.load(tmp_path / "out.npz") as z, np.load(big_src) as want:
        assert np.array_equal(z["w"], want["w"].astype(np.float16))


def test_a_worker_over_the_dask_memory_limit_is_a_clear_error_naming_the_share(big_src, tmp_path):
    from shardconv.errors import WorkerError

    baseline = _baseline()
    cluster, client = _cluster(baseline + (16 << 20))      # far less than the 512 MiB budget needs
    try:
        with pytest.raises(WorkerError, match=r"share 0 was lost with its worker") as e:
            convert(Job(src=str(big_src), dest=str(tmp_path / "out.npz"), mapping=BUFFERED, max_memory=512 << 20),
                    client=client)
        assert "\n" not in str(e.value)
    finally:
        client.close()
        cluster.close()
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("ocdbt", [False, True], ids=["per-array", "ocdbt"])
def test_an_orbax_checkpoint_from_two_workers_equals_one_process_and_the_restore(tmp_path, ocdbt):
    ocp = pytest.importorskip("orbax.checkpoint")
    rng = np.random.default_rng(3)
    tree = {"dense": {"kernel": rng.standard_normal((512, 1024)).astype(np.float32),
                      "bias": rng.standard_normal(1024).astype(np.float32)},
            "embed": rng.standard_normal((700, 512)).astype(np.float32), "step": np.int64(12)}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)) as c:
        c.save(tmp_path / "ckpt", tree)
    want = _single(tmp_path / "ckpt", tmp_path / "one" / "out.npz")
    dest = tmp_path / "two" / "out.npz"
    dest.parent.mkdir()
    convert(Job(src=str(tmp_path / "ckpt"), dest=str(dest), max_memory=BUDGET), workers=2, share_bytes=1 << 20)
    assert _digest(dest) == want
    with np.load(dest) as z:
        assert np.array_equal(z["dense/kernel"], tree["dense"]["kernel"]) and z["step"] == 12


def test_a_coordinator_killed_after_half_the_shares_then_rerun_redoes_no_finished_share(src, tmp_path):
    """A real SIGKILL of the coordinator and its worker pool mid-run (reads slowed down so the
    kill lands in the middle), then the same command again."""
    import signal
    import time

    from shardconv.testing import throttle

    dest = tmp_path / "out.npz"
    env = {**os.environ, **throttle.sitecustomize(tmp_path / "slow"), throttle.ENV: "4"}
    argv = [sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--max-memory", str(BUDGET),
            "--workers", "1", "--share-size", str(SHARE), "--quiet"]
    p = subprocess.Popen(argv, env=env, start_new_session=True, stderr=subprocess.PIPE)
    staging = Staging(Destination.parse(dest).path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        table = distributed.load_table(staging) if (staging.dir / distributed.TABLE).exists() else None
        if table is not None and len(distributed.missing_shares(dest)) <= len(table.shares) // 2:
            break
        time.sleep(0.02)
    assert p.poll() is None, p.stderr.read() if p.stderr else ""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    left = distributed.missing_shares(dest)
    finished = set(range(len(table.shares))) - set(left)
    assert finished and left
    kept_chunks = sum(len(table.shares[k]) for k in finished)
    kept_bytes = sum(table.shares[k].nbytes for k in finished)
    r = subprocess.run(argv[:-5] + ["--workers", "2", "--share-size", str(SHARE), "--quiet", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["chunks_resumed"] >= kept_chunks and result["bytes_written"] <= result["bytes_total"] - kept_bytes
    assert _digest(dest) == _single(src, tmp_path / "ref" / "out.npz")
    assert not staging.dir.exists()
