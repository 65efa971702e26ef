"""Engine promises: memory budget, resume after SIGKILL, atomic commit, locking, refusals."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import baseline_rss, peak_rss, run_cli, shardconv_cmd, tree_digest
from reference import load_reference_index, reference_prefix

import shardconv
from shardconv.core.staging import Staging
from shardconv.errors import DestinationError, ResumeError

MiB = 1 << 20


def _member_digests(npz: Path) -> dict[str, str]:
    with np.load(npz, allow_pickle=False) as z:
        return {k: hashlib.sha256(np.ascontiguousarray(z[k]).tobytes()).hexdigest() for k in z.files}


def test_tensors_larger_than_the_budget_convert_exactly_within_it(big_ckpt, tmp_path):
    """~58 MiB tensors through a 16 MiB budget; RSS measured from outside the process."""
    prefix = reference_prefix(big_ckpt)
    index = load_reference_index(big_ckpt)["tensors"]
    largest = max(int(np.prod(t["shape"])) * 4 for t in index.values())
    budget = 16 * MiB
    assert largest > 3 * budget
    baseline = baseline_rss(prefix)
    rc, peak = peak_rss(shardconv_cmd("convert", prefix, tmp_path / "o.npz", "--max-memory", "16MiB", "--quiet"))
    assert rc == 0
    assert peak - baseline <= budget, f"peak {peak / MiB:.0f} MiB, baseline {baseline / MiB:.0f} MiB"
    assert _member_digests(tmp_path / "o.npz") == {k: v["sha256"] for k, v in index.items()}


def test_repeated_sigkill_at_chunk_and_journal_points_then_resume_is_byte_identical(big_ckpt, tmp_path):
    prefix = reference_prefix(big_ckpt)
    clean = tmp_path / "clean.npz"
    shardconv.convert(prefix, clean, max_memory="32MiB")
    dest = tmp_path / "o.npz"
    for point in ["chunk:2", "journal:9", "chunk:30", "journal:31", "finish"]:
        p = run_cli("convert", prefix, dest, "--max-memory", "32MiB", "--quiet", env={"SHARDCONV_TEST_KILL": point})
        assert p.returncode == -signal.SIGKILL, (point, p.stderr)
        assert not dest.exists(), point
    r = shardconv.convert(prefix, dest, max_memory="32MiB")
    assert r.chunks_resumed > 30 and r.chunks_written < 5
    assert dest.read_bytes() == clean.read_bytes()
    assert not Path(str(dest) + ".partial").exists()


def test_kill_after_rename_leaves_a_complete_output(big_ckpt, tmp_path):
    prefix = reference_prefix(big_ckpt)
    clean = tmp_path / "clean.npz"
    shardconv.convert(prefix, clean, max_memory="32MiB")
    dest = tmp_path / "o.npz"
    p = run_cli("convert", prefix, dest, "--max-memory", "32MiB", "--quiet", env={"SHARDCONV_TEST_KILL": "renamed"})
    assert p.returncode == -signal.SIGKILL
    assert dest.read_bytes() == clean.read_bytes()


def test_sigkill_at_random_times_then_resume_is_byte_identical(big_ckpt, tmp_path):
    prefix = reference_prefix(big_ckpt)
    clean = tmp_path / "clean.npz"
    argv = ["--max-memory", "1MiB", "--quiet", "--no-fsync"]
    t0 = time.monotonic()
    assert run_cli("convert", prefix, clean, *argv).returncode == 0
    duration = time.monotonic() - t0
    dest = tmp_path / "o.npz"
    rng = random.Random(7)
    kills = 0
    for attempt in range(60):
        proc = subprocess.Popen(shardconv_cmd("convert", prefix, dest, *argv), stderr=subprocess.PIPE)
        # Kills land in the first half of a full run's time, so a resumed run (which keeps what
        # was journaled and copies only the rest) is interrupted at least once more; later
        # attempts wait longer, so on a loaded machine no run starves.
        time.sleep(duration * (0.15 + 0.35 * rng.random()) * (1 + attempt / 10))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()
        if dest.exists():  # finished, or killed after the atomic rename: complete either way
            assert dest.read_bytes() == clean.read_bytes()
            break
    assert kills >= 2, "the conversion finished before it could be interrupted"
    assert dest.read_bytes() == clean.read_bytes()


def _copy_ckpt(src_dir: Path, dst: Path) -> Path:
    shutil.copytree(src_dir, dst)
    return reference_prefix(dst)


def test_changed_source_is_refused_on_resume_and_restart_discards(big_ckpt, tmp_path):
    prefix = _copy_ckpt(big_ckpt, tmp_path / "ck")
    dest = tmp_path / "o.npz"
    p = run_cli("convert", prefix, dest, "--quiet", env={"SHARDCONV_TEST_KILL": "journal:3"})
    assert p.returncode == -signal.SIGKILL
    data = next(prefix.parent.glob("*.data-00001-of-*"))
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ResumeError, match=r"source file '[^']*data-00001-of-\d+' changed \(ctime_ns, mtime_ns\)"):
        shardconv.convert(prefix, dest)
    r = shardconv.convert(prefix, dest, restart=True)
    assert r.chunks_resumed == 0 and dest.exists()


@pytest.mark.parametrize("durable", [True, False])
def test_fsync_makes_output_and_renames_durable_and_no_fsync_calls_none(tmp_path, monkeypatch, durable):
    """Default: the output files and every directory renamed into are fsynced before the run
    returns. --no-fsync: no fsync at all (the rename stays atomic)."""
    import stat

    np.savez(tmp_path / "in.npz", a=np.arange(1000))
    synced: list[tuple[str, int]] = []
    real = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    dest = tmp_path / "out" / "o.npz"
    dest.parent.mkdir()
    shardconv.convert(tmp_path / "in.npz", dest, fsync=durable)
    monkeypatch.undo()
    if not durable:
        assert synced == []
        return
    inodes = {kind: {ino for k, ino in synced if k == kind} for kind in ("dir", "file")}
    assert dest.stat().st_ino in inodes["file"]
    assert Path(str(dest) + ".shardconv.json").stat().st_ino in inodes["file"]
    assert dest.parent.stat().st_ino in inodes["dir"]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    np.savez(tmp_path / "in.npz", a=np.arange(10))
    dest = tmp_path / "o.npz"
    holder = Staging(dest.absolute())
    holder.acquire()
    try:
        with pytest.raises(DestinationError, match=f"pid {os.getpid()}"):
            shardconv.convert(tmp_path / "in.npz", dest)
    finally:
        holder.release(remove=False)
    shardconv.convert(tmp_path / "in.npz", dest)  # lock released: proceeds


def test_stale_lock_from_a_killed_run_is_taken_over(tmp_path):
    np.savez(tmp_path / "in.npz", a=np.arange(10))
    dest = tmp_path / "o.npz"
    p = run_cli("convert", tmp_path / "in.npz", dest, "--quiet", env={"SHARDCONV_TEST_KILL": "journal:0"})
    assert p.returncode == -signal.SIGKILL
    assert (Path(str(dest) + ".partial") / "lock").exists()
    shardconv.convert(tmp_path / "in.npz", dest)
    assert dest.exists()


# ----------------------------------------------------------------- bad input

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


CORRUPTIONS = {
    "truncated data file": (lambda p: _truncate(next(p.parent.glob("*.data-00000-*")), 1000), r"truncated"),
    "flipped data byte": (lambda p: _flip(next(p.parent.glob("*.data-00002-*")), 12345), r"checksum mismatch in tensor"),
    "missing shard": (lambda p: next(p.parent.glob("*.data-00001-*")).unlink(), r"data shard 1 of 3 is missing"),
    "corrupt index block": (lambda p: _flip(Path(str(p) + ".index"), 20), r"checksum mismatch in (data|index) block|corrupt"),
    "truncated index": (lambda p: _truncate(Path(str(p) + ".index"), 100), r"bad magic|truncated"),
    "empty index": (lambda p: _truncate(Path(str(p) + ".index"), 0), r"smaller than the 48-byte footer"),
}


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    from reference import write_fixture

    return write_fixture("big", tmp_path_factory.mktemp("small"), "--mib", "4", "--shards", "3", "--no-reference")


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_input_gives_one_line_and_no_output(small_ckpt, tmp_path, case):
    corrupt, pattern = CORRUPTIONS[case]
    prefix = _copy_ckpt(small_ckpt, tmp_path / "ck")
    corrupt(prefix)
    before = tree_digest(prefix.parent)
    dest = tmp_path / "o.npz"
    p = run_cli("convert", prefix, dest, "--max-memory", "8MiB", "--quiet")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardconv: error: "), p.stderr
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not dest.exists()
    assert tree_digest(prefix.parent) == before


def test_nonexistent_path_and_existing_destination(tmp_path, small_ckpt):
    p = run_cli("convert", tmp_path / "nope", tmp_path / "o.npz")
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [f"shardconv: error: {tmp_path / 'nope'}: no such file or directory"]
    (tmp_path / "o.npz").write_bytes(b"precious")
    p = run_cli("convert", reference_prefix(small_ckpt), tmp_path / "o.npz", "--quiet")
    assert p.returncode != 0 and "already exists; pass --overwrite" in p.stderr
    assert (tmp_path / "o.npz").read_bytes() == b"precious"


def test_debug_shows_the_traceback(tmp_path):
    p = run_cli("convert", tmp_path / "nope", tmp_path / "o.npz", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr


# ----------------------------------------------------------------- footprint

def test_import_and_tf_conversion_load_neither_tensorflow_jax_nor_tensorstore(small_ckpt, tmp_path):
    code = f"""
import sys, shardconv
shardconv.list_tensors({str(reference_prefix(small_ckpt))!r})
shardconv.convert({str(reference_prefix(small_ckpt))!r}, {str(tmp_path / 'o.npz')!r})
shardconv.verify({str(tmp_path / 'o.npz')!r}, {str(reference_prefix(small_ckpt))!r})
heavy = [m for m in ("tensorflow", "jax", "tensorstore", "zarr", "keras") if m in sys.modules]
print(",".join(heavy))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == ""


def test_ls_text_and_json(small_ckpt):
    p = run_cli("ls", reference_prefix(small_ckpt), "--json")
    listing = json.loads(p.stdout)
    want = load_reference_index(small_ckpt)["tensors"]
    assert {t["name"]: t["shape"] for t in listing} == {k: v["shape"] for k, v in want.items()}
    p = run_cli("ls", reference_prefix(small_ckpt))
    assert "big/embedding" in p.stdout and "float32" in p.stdout


def test_verify_detects_a_changed_output(small_ckpt, tmp_path):
    prefix = reference_prefix(small_ckpt)
    shardconv.convert(prefix, tmp_path / "o.npz")
    assert run_cli("verify", tmp_path / "o.npz", prefix).returncode == 0
    _flip(tmp_path / "o.npz", 5000)
    p = run_cli("verify", tmp_path / "o.npz", prefix)
    assert p.returncode != 0 and ("differs" in p.stderr or "checksum" in p.stderr), p.stderr


def test_resume_with_a_different_budget_reuses_the_journal_chunks(big_ckpt, tmp_path):
    prefix = reference_prefix(big_ckpt)
    clean = tmp_path / "clean.npz"
    first = shardconv.convert(prefix, clean, max_memory="8MiB")
    dest = tmp_path / "o.npz"
    p = run_cli("convert", prefix, dest, "--max-memory", "8MiB", "--quiet", env={"SHARDCONV_TEST_KILL": "journal:40"})
    assert p.returncode == -signal.SIGKILL
    from shardconv.errors import BudgetError
    with pytest.raises(BudgetError, match="from the partial output's journal"):
        shardconv.convert(prefix, dest, max_memory="1MiB")
    r = shardconv.convert(prefix, dest, max_memory="512MiB")
    assert r.chunks_resumed == 41 and r.chunk_bytes == first.chunk_bytes < 1 * MiB
    assert dest.read_bytes() == clean.read_bytes()


def test_manifest_disagreeing_with_the_archive_is_reported(small_ckpt, tmp_path):
    shardconv.convert(reference_prefix(small_ckpt), tmp_path / "o.npz")
    m = tmp_path / "o.npz.shardconv.json"
    doc = json.loads(m.read_text())
    doc["tensors"][0]["crc32"] ^= 1
    m.write_text(json.dumps(doc))
    p = run_cli("verify", tmp_path / "o.npz")
    assert p.returncode != 0 and "in the manifest" in p.stderr


# ----------------------------------------------------------------- the filesystem (issue 12)

def test_planted_link_at_the_staging_directory_fails_in_one_line_and_keeps_the_target(tmp_path):
    np.savez(tmp_path / "in.npz", a=np.arange(10))
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"mine")
    dest = tmp_path / "o.npz"
    Path(f"{dest}.partial").symlink_to(target)
    p = run_cli("convert", tmp_path / "in.npz", dest, "--quiet")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"shardconv: error: {dest}.partial: is a symbolic link; shardconv stages only in a directory it made "
        "(remove it)"]
    assert [(f.name, f.read_bytes()) for f in target.iterdir()] == [("keep.txt", b"mine")]
    assert not dest.exists()


@pytest.mark.parametrize("case", ["foreign files", "another user"])
def test_a_staging_directory_shardconv_did_not_make_is_refused_and_kept(tmp_path, case):
    np.savez(tmp_path / "in.npz", a=np.arange(10))
    dest = tmp_path / "o.npz"
    partial = Path(f"{dest}.partial")
    partial.mkdir()
    (partial / "notes.txt").write_bytes(b"mine")
    if case == "another user":
        (partial / "lock").write_bytes(b"")
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory to another user")
        os.chown(partial, 65534, 65534)
    with pytest.raises(DestinationError, match="has no lock" if case == "foreign files" else "another user"):
        shardconv.convert(tmp_path / "in.npz", dest)
    assert (partial / "notes.txt").read_bytes() == b"mine" and not dest.exists()


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_publish_without_overwrite_never_replaces(tmp_path, monkeypatch, renameat2, kind):
    """The final rename itself cannot replace what appeared at DEST: renameat2(RENAME_NOREPLACE),
    or where it is missing, link-then-unlink (files) and lstat-then-rename (directories)."""
    from shardconv.util import safefs

    if not renameat2:
        monkeypatch.setattr(safefs, "_renameat2", None)
    elif safefs._renameat2 is None:
        pytest.skip("no renameat2 in this libc")
    src, dst = tmp_path / "staged", tmp_path / "dest"
    for p, data in ((src, b"new"), (dst, b"old")):
        if kind == "directory":
            p.mkdir()
            (p / "f").write_bytes(data)
        else:
            p.write_bytes(data)
    with pytest.raises(DestinationError, match="not replaced without overwrite=True"):  # Python speaks Python
        safefs.publish(src, dst, overwrite=False, aside=tmp_path / "aside")
    read = (lambda p: (p / "f").read_bytes()) if kind == "directory" else (lambda p: p.read_bytes())
    assert read(dst) == b"old" and read(src) == b"new"
    dst_link = tmp_path / "dangling"
    dst_link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DestinationError):
        safefs.publish(src, dst_link, overwrite=False, aside=tmp_path / "aside")
    assert dst_link.is_symlink() and not (tmp_path / "nowhere").exists()
    safefs.publish(src, tmp_path / "fresh", overwrite=False, aside=tmp_path / "aside")
    assert read(tmp_path / "fresh") == b"new" and not src.exists()


def test_a_source_changed_during_the_run_is_refused_and_nothing_reaches_dest(tmp_path, monkeypatch):
    """The npz is replaced (new inode, new bytes) after the first chunk: the reader still holds
    the old file, so only the fingerprint taken again before the final rename can notice."""
    from shardconv.errors import SourceError
    from shardconv.sinks import npz as npz_sink

    src = tmp_path / "in.npz"
    np.savez(src, a=np.arange(300_000, dtype=np.int64), b=np.ones(300_000))
    np.savez(tmp_path / "new.npz", a=np.arange(300_000, dtype=np.int64) + 1, b=np.ones(300_000))
    real = npz_sink.NpzSink.write_part  # every chunk of a stored npz is copied in parts

    def write_then_change(self, chunk, data):
        if (tmp_path / "new.npz").exists():
            os.replace(tmp_path / "new.npz", src)
        return real(self, chunk, data)

    monkeypatch.setattr(npz_sink.NpzSink, "write_part", write_then_change)
    dest = tmp_path / "o.npz"
    with pytest.raises(SourceError, match=r"in\.npz: the input changed while it was being converted \(.*in\.npz"):
        shardconv.convert(src, dest, max_memory="1MiB")
    assert not os.path.lexists(dest) and not os.path.lexists(f"{dest}.partial")
    monkeypatch.undo()
    shardconv.convert(src, dest, max_memory="1MiB")
    assert _member_digests(dest) == _member_digests(src)


def test_a_sink_refusing_the_plan_leaves_no_partial(tmp_path, monkeypatch):
    from shardconv.errors import PlanError
    from shardconv.sinks import npz as npz_sink

    np.savez(tmp_path / "in.npz", a=np.arange(10))
    monkeypatch.setattr(npz_sink.NpzSink, "check_outputs", lambda self, outputs: [f"{outputs[0].name!r}: refused"])
    dest = tmp_path / "o.npz"
    with pytest.raises(PlanError, match=f"^{dest}: 'a': refused$"):
        shardconv.convert(tmp_path / "in.npz", dest)
    assert not os.path.lexists(f"{dest}.partial") and not os.path.lexists(dest)


def test_a_journal_header_without_a_chunk_size_is_a_resume_error(tmp_path):
    np.savez(tmp_path / "in.npz", a=np.arange(10))
    dest = tmp_path / "o.npz"
    p = run_cli("convert", tmp_path / "in.npz", dest, "--quiet", env={"SHARDCONV_TEST_KILL": "journal:0"})
    assert p.returncode == -signal.SIGKILL
    journal = Path(f"{dest}.partial") / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    del header["chunk_bytes"]
    journal.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
    with pytest.raises(ResumeError, match=r"no valid chunk size; rerun with restart=True"):
        shardconv.convert(tmp_path / "in.npz", dest)
    shardconv.convert(tmp_path / "in.npz", dest, restart=True)
    assert dest.exists()
