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
    kill_at(src, dest, "journal:3")
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


#: A durable mark after every chunk (the default is one per 256 MiB).
EVERY_CHUNK = {"SHARDCONV_TEST_MARK_BYTES": "1"}


def test_rule10_a_durable_mark_follows_a_sync_and_counts_the_records_before_it(src, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3", EVERY_CHUNK)
    recs = [json.loads(ln) for ln in lines(dest)[1:] if ln]
    assert recs[1::2] == [{"d": 1}, {"d": 2}, {"d": 3}] and [r["i"] for r in recs[0::2]] == [0, 1, 2, 3]
    # in process: every mark comes right after an fsync of the output; none with fsync off
    from shardconv.core import pipeline

    monkeypatch.setattr(pipeline, "MARK_BYTES", 1)
    events: list[str] = []
    real_fsync, real_append = os.fsync, Journal.append
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(f"fsync:{os.readlink(f'/proc/self/fd/{fd}')}"),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(Journal, "append", lambda self, rec: (events.append("mark" if "d" in rec else "chunk"),
                                                              real_append(self, rec))[1])
    shardconv.convert(src, tmp_path / "fresh.npz", max_memory="1MiB")
    marks = [k for k, e in enumerate(events) if e == "mark"]
    assert len(marks) == events.count("chunk") > 3
    assert all(events[k - 1].startswith("fsync:") and events[k - 1].endswith("fresh.npz") for k in marks), events
    events.clear()
    shardconv.convert(src, tmp_path / "nosync.npz", max_memory="1MiB", fsync=False)
    assert "mark" not in events and events.count("chunk") > 3


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
    kill_at(src, dest, "journal:3", EVERY_CHUNK)  # marks vouch for chunks 0-2; chunk 3 has none
    checked, kept, r = _resume_counting_checks(src, dest, monkeypatch)
    assert r.chunks_resumed == 4 and len(checked) == 1  # only chunk 3 was read back
    assert [x.get("i", x) for x in kept[0]] == [0, 1, 2, {"d": 3}, 3]
    assert dest.read_bytes() == clean.read_bytes()


def test_rule10_a_mark_counting_more_records_than_precede_it_is_ignored(src, tmp_path, monkeypatch):
    dest = tmp_path / "o.npz"
    kill_at(src, dest, "journal:3")
    path = Path(f"{dest}.partial") / "journal.jsonl"
    raw = lines(dest)
    raw.insert(2, b'{"d":4}')  # after one record, a mark claiming four
    path.write_bytes(b"\n".join(raw))
    checked, kept, r = _resume_counting_checks(src, dest, monkeypatch)
    assert r.chunks_resumed == 4 and len(checked) == 4 and {"d": 4} not in kept[0]
