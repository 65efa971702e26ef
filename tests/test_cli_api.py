"""The CLI and Python API surface (issue 13, point 5): verify's exit codes and mapping flags,
--json, --include/--exclude/--dtype, --dry-run, help text, messages that speak the front end's
language, the top-level API. The CLI runs as a subprocess; sources are written by NumPy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import shardconv
from shardconv.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import assert_python_runs, run_cli  # noqa: E402


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, repr(stderr)
    return lines[0]


@pytest.fixture
def src(tmp_path) -> Path:
    """A small training checkpoint as np.savez writes it: two weights and an optimizer slot."""
    p = tmp_path / "in.npz"
    np.savez(p, **{"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                   "dense/bias": np.ones(3, np.float32),
                   "step": np.array(7, np.int64)})
    return p


def converted(src: Path, dest: Path, *args: str) -> Path:
    p = run_cli("convert", src, dest, "--quiet", *args)
    assert p.returncode == 0, p.stderr
    return dest


# -- verify: exit codes as cmp/diff, mapping flags, --json

def test_verify_exit_0_when_equal_with_json_counts(src, tmp_path):
    out = converted(src, tmp_path / "o.npz")
    p = run_cli("verify", out, src, "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["tensors"] == 3 and r["bytes_compared"] == 6 * 4 + 3 * 4 + 8 and r["checksums_verified"] == 3


def test_verify_exit_1_when_a_value_differs(src, tmp_path):
    out = converted(src, tmp_path / "o.npz")
    other = tmp_path / "other.npz"
    np.savez(other, **{"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3) + 1,
                       "dense/bias": np.ones(3, np.float32), "step": np.array(7, np.int64)})
    p = run_cli("verify", out, other, "--quiet")
    assert p.returncode == 1 and "dense/kernel" in one_line(p.stderr)


def test_verify_exit_1_when_the_output_is_corrupt(src, tmp_path):
    out = converted(src, tmp_path / "o.npz")
    data = bytearray(out.read_bytes())
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("dense/kernel.npy")
    h = info.header_offset
    name_len, extra_len = int.from_bytes(data[h + 26:h + 28], "little"), int.from_bytes(data[h + 28:h + 30], "little")
    data[h + 30 + name_len + extra_len + info.file_size - 1] ^= 0xFF  # the member's last byte
    out.write_bytes(bytes(data))
    p = run_cli("verify", out, "--quiet")
    assert p.returncode == 1 and "checksum" in one_line(p.stderr)


def test_verify_exit_2_on_trouble(src, tmp_path):
    out = converted(src, tmp_path / "o.npz")
    p = run_cli("verify", out, tmp_path / "missing.npz", "--quiet")
    assert p.returncode == 2 and one_line(p.stderr).startswith("shardconv: error:")
    p = run_cli("verify", out, "--max-memory", "lots")
    assert p.returncode == 2
    p = run_cli("verify")
    assert p.returncode == 2


def test_verify_help_documents_exit_codes():
    p = run_cli("verify", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "0 the output is intact" in text and "1 it differs" in text and "2 trouble" in text
    for flag in ("--rules", "--preset", "--prefer-ema", "--drop-optimizer", "--allow-unmapped", "--names"):
        assert flag in p.stdout


def test_verify_of_an_output_without_its_mapping_says_which_flags_to_pass(src, tmp_path):
    """An output that records no mapping (here np.savez's own file, as a SavedModel records
    none) written with --drop-optimizer: verify names the flags, and accepts them."""
    out = tmp_path / "weights.npz"
    np.savez(out, **{"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                     "dense/bias": np.ones(3, np.float32)})
    p = run_cli("verify", out, src, "--quiet")
    msg = one_line(p.stderr)
    assert p.returncode == 2 and "does not record the mapping" in msg and "--drop-optimizer" in msg and "--rules" in msg
    p = run_cli("verify", out, src, "--quiet", "--drop-optimizer")
    assert p.returncode == 0, p.stderr
    with pytest.raises(UsageError, match=r"drop_optimizer=, "):
        shardconv.verify(out, src)
    assert shardconv.verify(out, src, drop_optimizer=True)["tensors"] == 2


def test_convert_json_prints_the_result(src, tmp_path):
    p = run_cli("convert", src, tmp_path / "o.npz", "--json", "--drop-optimizer")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["dest"] == str(tmp_path / "o.npz") and r["tensors"] == 2 and r["bytes_total"] == 36
    assert r["dropped"] == [{"name": "step", "reason": r["dropped"][0]["reason"]}]


# -- --include / --exclude / --dtype as mapping options, --dry-run

def test_include_keeps_only_matching_names(src, tmp_path):
    p = run_cli("plan", src, "--include", "dense/*", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert sorted(o["name"] for o in r["outputs"]) == ["dense/bias", "dense/kernel"]
    assert r["dropped"] == [{"name": "step", "reason": "matches no --include pattern"}]


def test_exclude_is_repeatable_and_verify_recovers_it(src, tmp_path):
    out = converted(src, tmp_path / "o.npz", "--exclude", "dense/b*", "--exclude", "step")
    with np.load(out) as z:
        assert sorted(z.files) == ["dense/kernel"]
    p = run_cli("verify", out, src, "--quiet")
    assert p.returncode == 0, p.stderr
    p = run_cli("plan", src, "--exclude", "step")
    assert "excluded by --exclude step" in p.stdout


def test_dtype_casts_floating_point_tensors_only(src, tmp_path):
    import ml_dtypes

    out = converted(src, tmp_path / "o.npz", "--dtype", "bfloat16")
    tensors = {t.name: t for t in shardconv.list_tensors(out)}
    assert tensors["dense/kernel"].dtype == "bfloat16" and tensors["step"].dtype == "int64"
    with np.load(out) as z:
        assert z["dense/kernel"].view(ml_dtypes.bfloat16).astype(np.float32).tolist() == [[0, 1, 2], [3, 4, 5]]
    p = run_cli("verify", out, src, "--quiet")
    assert p.returncode == 0, p.stderr
    p = run_cli("plan", src, "--dtype", "int8")
    assert p.returncode != 0 and "not a floating-point dtype" in one_line(p.stderr)


def test_include_exclude_dtype_from_python(src, tmp_path):
    r = shardconv.convert(src, tmp_path / "o.npz", include="dense/*", exclude=["*/bias"], dtype="float16")
    assert r.tensors == 1 and [t.dtype for t in shardconv.list_tensors(tmp_path / "o.npz")] == ["float16"]
    assert ("dense/bias", "excluded by exclude='*/bias'") in r.dropped


def test_convert_dry_run_prints_the_plan_and_writes_nothing(src, tmp_path):
    dest = tmp_path / "sub" / "o.npz"
    p = run_cli("convert", src, dest, "--dry-run", "--drop-optimizer")
    assert p.returncode == 0, p.stderr
    assert "dense/kernel" in p.stdout and "2 outputs" in p.stdout and "left out 1" in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.npz"]


# -- help text, sizes, a mistyped command, usage of the subcommand

def test_every_argument_has_help_and_to_lists_the_sink_registry():
    import argparse

    from shardconv.cli import build_parser
    from shardconv.sinks import REGISTRY

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (command, action.dest)
        to = next((a for a in p._actions if a.dest == "to"), None)
        if to is not None:
            assert list(to.choices) == list(REGISTRY) and all(f in to.help for f in REGISTRY)
    p = run_cli("convert", "a", "b", "--to", "npy")
    assert p.returncode == 2 and p.stderr.startswith("usage: shardconv convert") and "invalid choice: 'npy'" in p.stderr


def test_sizes_binary_like_docker_decimal_with_b():
    from shardconv.util.units import parse_size

    assert [parse_size(s) for s in ("1K", "1k", "1KB", "1KiB", "2G", "2GB", "2GiB", "1.5M", "4096")] == \
        [1024, 1024, 1000, 1024, 2 << 30, 2 * 10**9, 2 << 30, 3 << 19, 4096]
    p = run_cli("convert", "--help")
    text = " ".join(p.stdout.split())
    assert "K, M, G binary as in Docker and -Xmx" in text
    assert "KB, MB, GB decimal" in text and "KiB, MiB, GiB binary" in text


def test_mistyped_command_suggests_the_closest():
    p = run_cli("convrt", "a", "b")
    assert p.returncode == 2 and "did you mean 'convert'?" in p.stderr.splitlines()[-1]
    p = run_cli("--debug", "lss")
    assert p.returncode == 2 and "did you mean 'ls'?" in p.stderr


def test_an_error_in_a_subcommand_shows_its_usage():
    p = run_cli("convert", "a")
    assert p.returncode == 2 and p.stderr.startswith("usage: shardconv convert")
    assert p.stderr.splitlines()[-1] == "shardconv convert: error: the following arguments are required: dest"


# -- messages name what the user gave, in the front end's language

def test_options_a_preset_implies_are_named_by_the_preset(src):
    p = run_cli("plan", src, "--preset", "keras-ema")
    msg = one_line(p.stderr)
    assert p.returncode == 1 and "preset keras-ema, but the checkpoint holds no EMA values" in msg
    assert "--prefer-ema" not in msg
    p = run_cli("plan", src, "--prefer-ema")
    assert "--prefer-ema, but the checkpoint holds no EMA values" in one_line(p.stderr)


def test_python_errors_speak_python_and_the_cli_speaks_flags(src, tmp_path):
    from shardconv.errors import DestinationError

    dest = converted(src, tmp_path / "o.npz")
    with pytest.raises(DestinationError) as e:
        shardconv.convert(src, dest)
    assert "overwrite=True" in str(e.value) and "--overwrite" not in str(e.value)
    p = run_cli("convert", src, dest)
    assert "pass --overwrite to replace it" in one_line(p.stderr)


def test_a_refused_resume_names_the_option_that_changed(src, tmp_path):
    import signal

    from shardconv.errors import ResumeError

    dest = tmp_path / "o.npz"
    p = run_cli("convert", src, dest, "--quiet", env={"SHARDCONV_TEST_KILL": "journal:0"})
    assert p.returncode == -signal.SIGKILL
    p = run_cli("convert", src, dest, "--quiet", "--drop-optimizer")
    msg = one_line(p.stderr)
    assert p.returncode == 1 and "options changed since it was started (--drop-optimizer False -> True)" in msg
    assert msg.endswith("rerun with --restart to start over")
    with pytest.raises(ResumeError, match=r"\(dtype None -> 'float16'\); rerun with restart=True"):
        shardconv.convert(src, dest, dtype="float16")
    p = run_cli("convert", src, dest, "--quiet", "--to", "npz", "--max-file-size", "1MiB")
    assert "--max-file-size None -> 1048576" in one_line(p.stderr)


def test_left_out_lists_use_the_names_ls_shows(keras_ema_ckpt):
    from reference import reference_prefix

    prefix = reference_prefix(keras_ema_ckpt)
    shown = {r["name"] for r in json.loads(run_cli("ls", prefix, "--json").stdout)}
    p = run_cli("plan", prefix, "--preset", "keras-ema", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["dropped"] and {d["name"] for d in report["dropped"]} <= shown
    assert {d["reason"] for d in report["dropped"]} >= {"optimizer state (preset keras-ema)"}
    assert report["totals"]["bytes_out"] + report["totals"]["bytes_dropped"] == report["totals"]["bytes_in"]


# -- the Python API: shardconv.plan, exports, progress

def test_shardconv_plan_is_the_function_even_after_its_module_is_imported():
    code = ("import sys, types, shardconv\n"
            "assert 'numpy' not in sys.modules\n"
            "from shardconv.core.plan import Plan, chunk_plan\n"
            "import shardconv.api, shardconv.core.engine\n"
            "assert callable(shardconv.plan) and not isinstance(shardconv.plan, types.ModuleType), shardconv.plan\n"
            "assert shardconv.plan is shardconv.api.plan and sys.modules['shardconv.core.plan'].Plan is Plan\n")
    assert_python_runs(code)


def test_errors_and_jax_tree_source_are_exported(src):
    import inspect

    import shardconv.errors as errors
    from shardconv.sources.jax_tree import JaxTreeSource

    classes = [n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.ShardconvError)]
    assert classes and all(getattr(shardconv, n) is getattr(errors, n) and n in shardconv.__all__ for n in classes)
    assert shardconv.JaxTreeSource is JaxTreeSource
    plan = shardconv.plan(src, drop_optimizer=True)
    assert sorted(o.name for o in plan.outputs) == ["dense/bias", "dense/kernel"]


def test_progress_accepts_a_callback(src, tmp_path):
    calls = []
    r = shardconv.convert(src, tmp_path / "o.npz", progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, r.bytes_total) and calls[-1] == (r.bytes_total, r.bytes_total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    calls.clear()
    shardconv.verify(tmp_path / "o.npz", src, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == r.bytes_total


def test_bars_come_from_tqdm_auto(src, tmp_path, monkeypatch):
    import tqdm.auto

    made = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            made.append(k.get("desc"))
            super().__init__(*a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    shardconv.convert(src, tmp_path / "o.npz", progress=True)
    shardconv.verify(tmp_path / "o.npz", progress=True)
    assert made == ["o.npz", "verify o.npz"]


def test_the_first_eta_is_measured_after_the_start_up():
    """A resumed run (half done), whose first piece takes 5 s of start-up and every later one 1 s:
    the ETA is 3 s after the second piece (tqdm alone says 20 s after the first, from the start-up)."""
    from shardconv.progress import start

    mib = 1 << 20
    p = start(True, total=100 * mib, initial=50 * mib, desc="t")
    clock = [p.bar.last_print_t]
    p.bar._time = lambda: clock[0]
    clock[0] += 5
    p.update(10 * mib)
    assert p.bar.format_dict["rate"] is None and "?" in str(p.bar)  # no ETA from the start-up alone
    clock[0] += 1
    p.update(10 * mib)
    d = p.bar.format_dict
    assert d["n"] == 70 * mib and abs(d["rate"] - 10 * mib) < mib and abs((d["total"] - d["n"]) / d["rate"] - 3) < 0.5
    p.close()


def test_help_imports_neither_numpy_nor_the_mapping_layer():
    import subprocess

    code = ("import sys\nfrom shardconv.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = sorted(m for m in sys.modules if m == 'numpy' or m.startswith(('shardconv.mapping', 'tqdm')))\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("tensorflow") is None, reason="needs tensorflow")
def test_verify_of_a_savedmodel_takes_the_mapping_flags_convert_was_given(src, tmp_path):
    """A SavedModel records no mapping: verify says which flags to pass (exit 2), and with them passes."""
    sm = tmp_path / "sm"
    p = run_cli("convert", src, sm, "--to", "savedmodel", "--drop-optimizer", "--quiet")
    assert p.returncode == 0, p.stderr
    p = run_cli("verify", sm, src, "--quiet")
    msg = one_line(p.stderr)
    assert p.returncode == 2 and "does not record the mapping" in msg and "--drop-optimizer" in msg
    p = run_cli("verify", sm, src, "--drop-optimizer", "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tensors"] == 2


def test_mapping_options_as_one_object_or_as_keywords(src, tmp_path):
    """convert, plan and verify take a MappingOptions (what the CLI passes) or the same options as
    keywords; both at once, or an unknown name, is a usage error."""
    from shardconv.mapping import MappingOptions

    opts = MappingOptions(exclude=["dense/bias"], drop_optimizer=True)
    assert [o.name for o in shardconv.plan(src, mapping=opts).outputs] == ["dense/kernel"]
    assert shardconv.plan(src, mapping=opts).digest() == shardconv.plan(src, exclude=["dense/bias"],
                                                                        drop_optimizer=True).digest()
    r = shardconv.convert(src, tmp_path / "o.npz", mapping=opts)
    assert r.tensors == 1 and shardconv.verify(tmp_path / "o.npz", src, mapping=opts)["bytes_compared"] == 24
    with pytest.raises(shardconv.UsageError, match="not both"):
        shardconv.plan(src, mapping=opts, drop_optimizer=True)
    with pytest.raises(shardconv.UsageError, match="unknown mapping option"):
        shardconv.plan(src, drop_optimiser=True)


def test_split_front_ends_write_the_bytes_one_process_writes(src, tmp_path):
    """api.convert(workers=2), and convert --share 0/2, 1/2 then finalize, give the single-process file."""
    one = tmp_path / "one.npz"
    shardconv.convert(src, one)
    two = tmp_path / "two.npz"
    shardconv.convert(src, two, workers=2, share_size="1KiB")
    assert two.read_bytes() == one.read_bytes()
    tasks = tmp_path / "tasks.npz"
    for task in ("0/2", "1/2"):
        p = run_cli("convert", src, tasks, "--share", task, "--share-size", "1KiB")
        assert p.returncode == 0 and f"task {task}" in p.stderr and not tasks.exists(), p.stderr
    p = run_cli("finalize", tasks, "--json", "--quiet")
    assert p.returncode == 0 and json.loads(p.stdout)["tensors"] == 3, p.stderr
    assert tasks.read_bytes() == one.read_bytes()
    p = run_cli("convert", src, tmp_path / "x.npz", "--share", "0/2", "--workers", "2")
    assert p.returncode == 2 and "does not combine" in p.stderr


def test_the_command_exits_at_once_with_its_output_flushed_and_its_exit_code(tmp_path, capsys):
    """``python -m shardconv`` skips the interpreter's teardown (cli.run): what ``main`` printed
    must still all arrive, and its exit code must be the process's."""
    from shardconv.cli import main

    small = Path(__file__).parent / "data" / "tf-serving" / "saved_model_half_plus_two_cpu" / "00000123"
    assert main(["ls", str(small)]) == 0
    want = capsys.readouterr()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a user's is
    p = subprocess.run([sys.executable, "-m", "shardconv", "ls", str(small)], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout == want.out and p.stderr == want.err and p.stdout
    p = run_cli("ls", tmp_path / "nothing-here")
    assert p.returncode == main(["ls", str(tmp_path / "nothing-here")]) != 0
    assert p.stderr.startswith("shardconv: error: ") and p.stderr.count("\n") == 1
