"""One test per rule of docs/journal-format.md, on journals written by shardconv."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shardconv
from shardconv.core.journal import Journal
from shardconv.errors import ResumeError
from shardconv.testing.sink_suite import BEFORE_RESTART


@pytest.fixture
def src(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", a=rng.standard_normal(400_000).astype(np.float32), b=np.arange(12.0).reshape(3, 4))
    return tmp_path / "in.npz"


def kill_at(src: Path, dest: Path, point: str, env: dict[str, str] | None = None) -> None:
    argv = [sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--max-memory", "1MiB", "--quiet"]
    p = subprocess.run(argv, env={**os.environ, "SHARDCONV_TEST_KILL": point, **(env or {})}, capture_output=True,
                       text=True)
    assert p.returncode == -9, p.stderr


def lines(dest: Path) -> list[bytes]:
    return (Path(f"{dest}.partial") / "journal.jsonl").read_bytes().split(b"\n")


def test_rule1_jsonl_in_the_staging_directory_never_at_dest(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    raw = lines(dest)
    assert raw[-1] == b"" and all(json.loads(ln.decode("utf-8")) for ln in raw[:-1])
    assert not dest.exists()
    shardconv.convert(src, dest, max_memory="1MiB")
    assert not Path(f"{dest}.partial").exists() and not list(tmp_path.glob("**/journal.jsonl"))


def test_rule2_header(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    head = json.loads(lines(dest)[0])
    assert list(head) == sorted(head)
    assert head["format"] == "shardconv-journal" and head["version"] == 1
    assert isinstance(head["chunk_bytes"], int) and head["chunk_bytes"] > 0
    assert head["sink"] == "npz" and head["sink_options"] == {} and head["dest"] == "o.npz"
    assert len(head["plan"]) == 64 and int(head["plan"], 16) >= 0
    assert set(head["source"]["tensors"]) == {"a", "b"} and "in.npz" in head["source"]["files"]
    assert set(head["source"]["files"]["in.npz"]) == {"size", "mtime_ns", "ctime_ns", "inode"}
    assert isinstance(head["options"], dict)
    assert head["boot"] == open("/proc/sys/kernel/random/boot_id").read().strip()


def test_rule3_chunk_records(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    head, *recs = [json.loads(ln) for ln in lines(dest)[:-1]]
    assert [r["i"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert set(r) == {"i", "o", "n", "r", "s"}
        assert r["n"] <= head["chunk_bytes"] and r["o"] == r["i"] * head["chunk_bytes"]  # tensor a first
        assert isinstance(r["r"], int)
        assert all(len(s) == 4 and s[0] == "a" for s in r["s"])


def test_rule4_a_record_follows_its_written_chunk(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "chunk:3")  # chunk 3 written, its record not yet appended
    recs = [json.loads(ln) for ln in lines(dest)[1:-1]]
    assert [r["i"] for r in recs] == [0, 1, 2]
    r = shardconv.convert(src, dest, max_memory="1MiB")
    assert r.chunks_resumed == 3


def test_rule5_a_torn_last_line_is_ignored(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    path = Path(f"{dest}.partial") / "journal.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the last record torn mid-write
    r = shardconv.convert(src, dest, max_memory="1MiB")
    assert r.chunks_resumed == 3


@pytest.mark.parametrize("damage", ["version", "format", "chunk_bytes", "middle"])
def test_rule6_an_unusable_journal_refuses_the_resume(src, tmp_path, damage):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    path = Path(f"{dest}.partial") / "journal.jsonl"
    raw = lines(dest)
    head = json.loads(raw[0])
    if damage == "middle":
        raw[2] = b"{not json"
    else:
        if damage == "chunk_bytes":
            del head["chunk_bytes"]
        else:
            head[damage] = 2 if damage == "version" else "other"
        raw[0] = json.dumps(head).encode()
    path.write_bytes(b"\n".join(raw))
    with pytest.raises(ResumeError, match=r"journal\.jsonl: .*restart") as e:
        Journal(path).load()
    assert "\n" not in str(e.value)
    with pytest.raises(ResumeError):
        shardconv.convert(src, dest, max_memory="1MiB")
    shardconv.convert(src, dest, max_memory="1MiB", restart=True)


def test_rule7_only_confirmed_records_are_kept_and_the_journal_rewritten(src, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3", BEFORE_RESTART)  # resumed after a restart: every record is checked
    path = Path(f"{dest}.partial") / "journal.jsonl"
    raw = lines(dest)
    rec = json.loads(raw[2])
    rec["r"] ^= 1  # the receipt of chunk 1 no longer matches its bytes
    raw[2] = json.dumps(rec).encode()
    bad = json.loads(raw[3])
    bad["n"] += 1  # chunk 2 no longer matches the plan's chunk
    raw[3] = json.dumps(bad).encode()
    path.write_bytes(b"\n".join(raw))
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((os.fspath(a), os.fspath(b))), real(a, b))[1])
    kept = []
    real_start = Journal.start
    monkeypatch.setattr(Journal, "start", lambda self, h, r=(), durable=True: (kept.append([x["i"] for x in r]),
                                                                                real_start(self, h, r, durable))[1])
    r = shardconv.convert(src, dest, max_memory="1MiB")
    assert r.chunks_resumed == 2 and kept == [[0, 3]]
    assert (str(path) + ".tmp", str(path)) in replaced


def test_rule8_a_changed_plan_refuses_the_resume(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    path = Path(f"{dest}.partial") / "journal.jsonl"
    raw = lines(dest)
    head = json.loads(raw[0])
    head["plan"] = "0" * 64
    raw[0] = json.dumps(head, sort_keys=True).encode()
    path.write_bytes(b"\n".join(raw))
    with pytest.raises(ResumeError, match="changed since it was started.*restart") as e:
        shardconv.convert(src, dest, max_memory="1MiB")
    assert "\n" not in str(e.value)


def test_rule9_a_resume_keeps_the_journaled_chunk_size(src, tmp_path):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    size = json.loads(lines(dest)[0])["chunk_bytes"]
    r = shardconv.convert(src, dest, max_memory="256MiB")
    assert r.chunk_bytes == size and r.chunks_resumed == 4


#: A durable mark after every chunk (the default is one per 4 GiB), on an earlier boot (a resume
#: after it trusts only what a mark vouches for).
EVERY_CHUNK = {"SHARDCONV_TEST_MARK_BYTES": "1", **BEFORE_RESTART}


def _marks_and_chunks(dest: Path) -> tuple[list[int], int]:
    recs = [json.loads(ln) for ln in lines(dest)[1:] if ln]
    seen, marks = 0, []
    for r in recs:
        if "d" in r:
            assert r["d"] <= seen, recs  # a mark counts only records before it
            marks.append(r["d"])
        else:
            seen += 1
    return marks, seen


def test_rule10_a_durable_mark_follows_a_sync_and_counts_the_records_before_it(src, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "mark:1", EVERY_CHUNK)  # killed right after the first durable mark
    marks, chunks = _marks_and_chunks(dest)
    assert len(marks) == 1 and 0 < marks[0] <= chunks
    # in process: every mark {"d": n} comes after an fsync of the output that began after the
    # n-th chunk record and ended before the mark; none with fsync off
    from shardconv.core import pipeline

    monkeypatch.setattr(pipeline, "MARK_BYTES", 1)
    events: list[tuple[str, int]] = []
    chunks_seen = [0]
    real_fsync, real_append = os.fsync, Journal.append

    def fsync(fd):
        out = os.readlink(f"/proc/self/fd/{fd}").endswith("fresh.npz")
        start = chunks_seen[0]
        real_fsync(fd)
        if out:
            events.append(("fsync", start))

    def append(self, rec):
        real_append(self, rec)
        if "d" in rec:
            events.append(("mark", rec["d"]))
        else:
            chunks_seen[0] += 1
            events.append(("chunk", chunks_seen[0]))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Journal, "append", append)
    shardconv.convert(src, tmp_path / "fresh.npz", max_memory="1MiB")
    marks = [(k, n) for k, (e, n) in enumerate(events) if e == "mark"]
    assert marks and marks[-1][1] <= chunks_seen[0]  # the run waits for a sync it started
    for k, n in marks:
        assert any(e == "fsync" and started >= n for e, started in events[:k]), (n, events[:k])
    events.clear()
    shardconv.convert(src, tmp_path / "nosync.npz", max_memory="1MiB", fsync=False)
    assert not [e for e in events if e[0] == "mark"] and chunks_seen[0] > 3


def _resume_counting_checks(src: Path, dest: Path, monkeypatch) -> tuple[list[int], list[list], object]:
    from shardconv.sinks.npz import NpzSink

    checked: list[int] = []
    real_check = NpzSink.check
    monkeypatch.setattr(NpzSink, "check", lambda self, c, r: (checked.append(c.offset), real_check(self, c, r))[1])
    kept: list[list] = []
    real_start = Journal.start
    monkeypatch.setattr(Journal, "start", lambda self, h, r=(), durable=True: (kept.append(list(r)),
                                                                                real_start(self, h, r, durable))[1])
    return checked, kept, shardconv.convert(src, dest, max_memory="1MiB")


def test_rule10_a_resume_keeps_marked_records_without_reading_them(src, tmp_path, monkeypatch):
    clean = tmp_path / "clean.npz"
    shardconv.convert(src, clean, max_memory="1MiB")
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "mark:1", EVERY_CHUNK)  # the mark vouches for the first t chunks
    marks, chunks = _marks_and_chunks(dest)
    t = marks[-1]
    checked, kept, r = _resume_counting_checks(src, dest, monkeypatch)
    assert r.chunks_resumed == chunks and len(checked) == chunks - t  # only those after the mark read back
    assert [x.get("i", x) for x in kept[0]] == list(range(t)) + [{"d": t}] + list(range(t, chunks))
    assert dest.read_bytes() == clean.read_bytes()


def test_rule10_a_mark_counting_more_records_than_precede_it_is_ignored(src, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3", BEFORE_RESTART)
    path = Path(f"{dest}.partial") / "journal.jsonl"
    raw = lines(dest)
    raw.insert(2, b'{"d":4}')  # after one record, a mark claiming four
    path.write_bytes(b"\n".join(raw))
    checked, kept, r = _resume_counting_checks(src, dest, monkeypatch)
    assert r.chunks_resumed == 4 and len(checked) == 4 and {"d": 4} not in kept[0]


def test_rule11_a_resume_on_the_same_boot_keeps_every_record_unread(src, tmp_path, monkeypatch):
    clean = tmp_path / "clean.npz"
    shardconv.convert(src, clean, max_memory="1MiB")
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:5")  # no mark: the default interval is far larger than this run
    assert _marks_and_chunks(dest) == ([], 6)
    checked, kept, r = _resume_counting_checks(src, dest, monkeypatch)
    assert r.chunks_resumed == 6 and checked == [] and [x["i"] for x in kept[0]] == list(range(6))
    assert dest.read_bytes() == clean.read_bytes()
    # the same journal from another boot: every record is read back
    dest2 = tmp_path / "o2.npz"
    kill_at(src, dest2, "journal:5", BEFORE_RESTART)
    checked, _, r = _resume_counting_checks(src, dest2, monkeypatch)
    assert r.chunks_resumed == 6 and len(checked) == 6
