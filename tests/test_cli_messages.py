"""One-line messages and exit codes of the CLI (run as a subprocess), and refusals of
names an output format cannot hold before anything is written (no DEST, no DEST.partial)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shardconv
from shardconv.api import plan as api_plan
from shardconv.errors import PlanError, UsageError
from shardconv.mapping import preset_names
from shardconv.sources import open_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import run_cli, shardconv_cmd  # noqa: E402
from reference import reference_prefix  # noqa: E402


def one_line(stderr: str) -> str:
    """The single line of ``stderr``, asserting there is exactly one and it cannot drive a terminal."""
    assert stderr.endswith("\n") and len(stderr.splitlines()) == 1, repr(stderr)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", stderr[:-1]), repr(stderr)
    return stderr[:-1]


def nothing_written(dest: Path) -> None:
    left = sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name))
    assert left == [], left


@pytest.fixture
def small_npz(tmp_path) -> Path:
    src = tmp_path / "in.npz"
    np.savez(src, **{"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return src


# -- usage errors: exit 2, one line

def test_rules_that_is_not_a_readable_file_is_a_usage_error(small_npz, tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    p = run_cli("plan", small_npz, "--rules", rules_dir)
    assert p.returncode == 2 and "is a directory" in one_line(p.stderr) and str(rules_dir) in p.stderr
    p = run_cli("convert", small_npz, tmp_path / "o.npz", "--rules", tmp_path / "missing.toml")
    assert p.returncode == 2 and "rules file not found" in one_line(p.stderr)
    nothing_written(tmp_path / "o.npz")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.toml"
        locked.write_text("[[rules]]\nmatch = '.*'\n")
        locked.chmod(0)
        p = run_cli("plan", small_npz, "--rules", locked)
        assert p.returncode == 2 and "cannot read" in one_line(p.stderr)


def test_unknown_preset_is_a_usage_error_listing_the_known_ones(small_npz, tmp_path):
    for args in (("plan", small_npz), ("convert", small_npz, tmp_path / "o.npz")):
        p = run_cli(*args, "--preset", "nope")
        line = one_line(p.stderr)
        assert p.returncode == 2 and "'nope'" in line
        assert all(name in line for name in preset_names()), line
    nothing_written(tmp_path / "o.npz")
    with pytest.raises(UsageError, match="unknown preset '../x'"):
        api_plan(small_npz, preset="../x")


# -- control characters in names and paths never reach the terminal

def test_error_with_newline_and_escape_in_names_prints_one_escaped_line(tmp_path):
    where = tmp_path / "run\n\x1b[31mred\x9b"
    where.mkdir()
    src = where / "in.npz"
    np.savez(src, **{"evil\nname\x1b[2J": np.zeros(3, np.float32)})
    p = run_cli("convert", src, tmp_path / "o.npz")
    line = one_line(p.stderr)
    assert p.returncode == 1 and line.startswith("shardconv: error: ")
    assert "evil\\nname\\x1b[2J" in line and "run\\n\\x1b[31mred\\x9b" in line
    nothing_written(tmp_path / "o.npz")


def test_one_line_escapes_every_control_character():
    from shardconv.cli import one_line as escape

    text = "a\nb\r\x1b\x00\t\x7f\x85\x9f\udc80\u2028\u202e é 日本 ok/name"
    out = escape(text)
    assert out == "a\\nb\\r\\x1b\\x00\\t\\x7f\\x85\\x9f\\udc80\\u2028\\u202e é 日本 ok/name"
    assert len(out.splitlines()) == 1


# -- SIGTERM: like Ctrl-C

def test_sigterm_prints_one_line_exits_143_and_the_rerun_resumes(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {f"layer{i}/w": rng.standard_normal((512, 1024), dtype=np.float32) for i in range(32)}  # 64 MiB
    src, dest = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **arrays)
    journal = dest.with_name(dest.name + ".partial") / "journal.jsonl"
    argv = ["convert", src, dest, "--max-memory", "16MiB"]
    proc = subprocess.Popen(shardconv_cmd(*argv, "--quiet"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 3:  # header and two chunks
            proc.send_signal(signal.SIGSTOP)  # hold it mid-run, however fast the disk
            break
        time.sleep(0.001)
    assert proc.poll() is None, "the conversion finished before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    line = one_line(err)
    assert "interrupted" in line and "rerun the same command to resume" in line
    assert journal.exists() and not dest.exists()
    p = run_cli(*argv)
    assert p.returncode == 0, p.stderr
    assert re.search(r"resumed [1-9]\d* chunks", p.stderr), p.stderr
    with np.load(dest) as z:
        assert sorted(z.files) == sorted(arrays)
        for k, v in arrays.items():
            assert np.array_equal(z[k], v), k


# -- names an output format cannot hold: refused before anything is written

def test_zarr_tf1_slots_refused_naming_dest_and_the_flag_then_converted_with_it(tf1_ema_ckpt, tmp_path):
    pytest.importorskip("tensorstore")
    src, dest = reference_prefix(tf1_ema_ckpt), tmp_path / "out.zarr"
    p = run_cli("convert", src, dest)
    line = one_line(p.stderr)
    assert p.returncode == 1 and line.startswith(f"shardconv: error: {dest}: ") and ".partial" not in line
    assert "'dense/kernel' is both a tensor and a group" in line and "--drop-optimizer" in line
    nothing_written(dest)
    p = run_cli("convert", src, dest, "--drop-optimizer", "--quiet")
    assert p.returncode == 0, p.stderr
    with open_source(dest) as s:
        assert sorted(t.name for t in s.tensors()) == ["bn/moving_mean", "dense/bias", "dense/kernel"]


def _rules_from(line: str) -> str:
    """The rename rules a message suggests, as a TOML file keeping every other name."""
    found = re.findall(r"\[\[rules\]\] match = ('[^']*') rename = ('[^']*')", line)
    assert found, line
    return "".join(f"[[rules]]\nmatch = {m}\nrename = {r}\n\n" for m, r in found) + "[[rules]]\nmatch = '.*'\n"


def test_zarr_names_refused_with_a_rule_that_fixes_them(tmp_path):
    pytest.importorskip("tensorstore")
    src, dest = tmp_path / "in.npz", tmp_path / "out.zarr"
    values = {"p/__init__/w": np.arange(3.0), "long/" + "x" * 300: np.arange(4.0),
              "enc/w": np.ones(2), "enc/w/scale": np.zeros(2), "ok": np.arange(5)}
    np.savez(src, **values)
    p = run_cli("convert", src, dest)
    line = one_line(p.stderr)
    assert p.returncode == 1 and line.startswith(f"shardconv: error: {dest}: 3 problems") and ".partial" not in line
    assert "'__init__' starts with '__'" in line and "300 bytes" in line and "'enc/w' is both" in line
    nothing_written(dest)
    (tmp_path / "fix.toml").write_text(_rules_from(line))
    p = run_cli("convert", src, dest, "--rules", tmp_path / "fix.toml", "--quiet")
    assert p.returncode == 0, p.stderr
    renamed = {"p/init__/w": "p/__init__/w", "long/" + "x" * 223: "long/" + "x" * 300, "enc/w/value": "enc/w",
               "enc/w/scale": "enc/w/scale", "ok": "ok"}
    with open_source(dest) as s:
        assert sorted(t.name for t in s.tensors()) == sorted(renamed)
        for new, old in renamed.items():
            assert np.array_equal(s.read(new), values[old]), new


def test_savedmodel_names_tensorflow_refuses_are_refused_without_importing_it(tmp_path):
    src, dest = tmp_path / "in.npz", tmp_path / "sm"
    values = {"_private/w": np.arange(3.0), "layer 1/kernel": np.ones((2, 2), np.float32),
              "del\x7fname": np.arange(2), "c1\x85name": np.arange(4), "fine/x": np.zeros(1)}
    np.savez(src, **values)
    code = ("import sys, shardconv\n"
            "try:\n"
            f"    shardconv.convert({str(src)!r}, {str(dest)!r}, to='savedmodel', progress=False)\n"
            "except shardconv.errors.PlanError as e:\n"
            "    print(str(e).encode('unicode_escape').decode())\n"
            "print('tensorflow' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    msg, imported = p.stdout.splitlines()
    assert imported == "False", p.stdout + p.stderr
    assert msg.count("is not a valid TensorFlow variable name") == 4, msg
    for name in ("'_private/w'", "'layer 1/kernel'", "'del\\\\x7fname'", "'c1\\\\x85name'"):
        assert name in msg
    nothing_written(dest)
    p = run_cli("convert", src, dest, "--to", "savedmodel")
    line = one_line(p.stderr)
    assert p.returncode == 1 and "4 problems" in line
    rules = tmp_path / "fix.toml"
    rules.write_text(_rules_from(line))
    p = run_cli("convert", src, dest, "--to", "savedmodel", "--rules", rules, "--quiet")
    assert p.returncode == 0, p.stderr
    renamed = {"private/w": "_private/w", "layer_1/kernel": "layer 1/kernel", "del_name": "del\x7fname",
               "c1_name": "c1\x85name", "fine/x": "fine/x"}
    with open_source(dest) as s:
        keys = {t.name.split("/.ATTRIBUTES")[0]: t.name for t in s.tensors() if t.name != "_CHECKPOINTABLE_OBJECT_GRAPH"}
        assert sorted(keys) == sorted(renamed)
        for new, old in renamed.items():
            assert np.array_equal(s.read(keys[new]), values[old]), new


def test_npz_member_names_a_zip_cannot_hold_are_refused_before_writing(tmp_path):
    dest = tmp_path / "o.npz"
    with pytest.raises(PlanError, match=r"over the zip limit of 65535"):
        shardconv.convert({"w" * 70000: np.zeros(2)}, dest, progress=False)
    nothing_written(dest)


def test_ls_into_a_reader_that_stops_early_exits_quietly(tmp_path):
    """``shardconv ls CKPT | head``: the closed pipe ends the listing with exit 0 and no traceback."""
    src = tmp_path / "many.npz"
    np.savez(src, **{f"layer_{i:05d}/kernel": np.zeros(1, np.float32) for i in range(4000)})
    proc = subprocess.run(["bash", "-c", f'set -o pipefail; "{sys.executable}" -m shardconv ls "{src}" | head -n 2'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "Traceback" not in proc.stderr and "Error" not in proc.stderr
