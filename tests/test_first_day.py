"""A new user's first day (issue 13): pointing shardconv at what people actually have.

Checkpoint directories without their ``checkpoint`` state file, the ``.meta``/``.data``/state
files themselves, parents of several checkpoint directories; a missing optional library;
a destination whose parent directories do not exist yet; ``--layout orbax --orbax-step N``
read back by ``orbax.checkpoint.CheckpointManager``. Messages are checked by running the CLI
as a subprocess; the checkpoints are written by real TensorFlow (in a subprocess).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from procs import run_cli

# TF1 Saver (steps 100 and 200, with .meta graphs and the ``checkpoint`` state file) and two
# SavedModel versions in TF Serving's layout. ``dense/kernel`` is arange(6) + 1 at step 100,
# + 2 at step 200.
_WRITE = textwrap.dedent("""
    import os, sys
    import numpy as np
    import tensorflow as tf
    out = sys.argv[1]
    os.makedirs(os.path.join(out, "train"))
    g = tf.Graph()
    with g.as_default():
        w = tf.compat.v1.get_variable("dense/kernel", use_resource=True,
                                      initializer=tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3)))
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver(max_to_keep=5)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            for step in (100, 200):
                s.run(w.assign_add(tf.ones((2, 3))))
                saver.save(s, os.path.join(out, "train", "model.ckpt"), global_step=step)
    class M(tf.Module):
        def __init__(self, v):
            self.w = tf.Variable(np.full((2, 2), v, np.float32))
    for v in (1, 2):
        tf.saved_model.save(M(v), os.path.join(out, "serving", str(v)))
""")

KERNEL = {100: np.arange(6, dtype=np.float32).reshape(2, 3) + 1,
          200: np.arange(6, dtype=np.float32).reshape(2, 3) + 2}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first_day")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    subprocess.run([sys.executable, "-c", _WRITE, str(out)], check=True, capture_output=True, env=env,
                   timeout=600)
    return out


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _error(r: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (and nothing else on stderr)."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("shardconv: error: "), r.stderr
    return lines[0]


def _copied_by_hand(src: Path, dest: Path) -> Path:
    """The checkpoint files of ``src`` without its ``checkpoint`` state file."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint"))
    return dest


def _kernel(npz: Path) -> np.ndarray:
    with np.load(npz) as z:
        return z["dense/kernel"]


# ------------------------------------------------------------------ pointing at checkpoints

def test_directory_without_state_file_opens_the_newest_step_and_says_which(written, tmp_path):
    d = _copied_by_hand(written / "train", tmp_path / "copied")
    for cmd in (["ls", d], ["plan", d]):
        r = run_cli(*cmd)
        assert r.returncode == 0, r.stderr
        assert f"{d}: opened step 200 ({d / 'model.ckpt-200'}); --step N opens another" in r.stderr
        assert "dense/kernel" in r.stdout
    r = run_cli("ls", d, "--quiet")
    assert r.returncode == 0 and r.stderr == ""
    r = run_cli("convert", d, tmp_path / "o.npz")
    assert r.returncode == 0, r.stderr
    assert "opened step 200" in r.stderr
    np.testing.assert_array_equal(_kernel(tmp_path / "o.npz"), KERNEL[200])
    r = run_cli("convert", d, tmp_path / "o100.npz", "--step", "100", "-q")
    assert r.returncode == 0 and r.stderr == ""
    np.testing.assert_array_equal(_kernel(tmp_path / "o100.npz"), KERNEL[100])


def test_directory_of_two_series_lists_them_and_says_what_to_pass(written, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for f in (written / "train").glob("model.ckpt-*"):
        name = f.name if "-100." in f.name else f.name.replace("model.ckpt-200", "other-200")
        shutil.copy(f, d / name)
    line = _error(run_cli("ls", d))
    assert f"{d}: holds 2 checkpoints (model.ckpt-100, other-200)" in line
    assert f"pass a prefix such as {d / 'other-200'} or --step N" in line
    r = run_cli("ls", d / "other-200")
    assert r.returncode == 0, r.stderr


def test_meta_data_and_state_files_open_the_checkpoint_they_belong_to(written):
    train = written / "train"
    for f in ("model.ckpt-100.meta", "model.ckpt-100.data-00000-of-00001"):
        r = run_cli("ls", train / f, "--json")
        assert r.returncode == 0, r.stderr
        assert '"dense/kernel"' in r.stdout
    r = run_cli("ls", train / "checkpoint")
    assert r.returncode == 0, r.stderr
    assert f"{train / 'checkpoint'}: opened step 200 ({train / 'model.ckpt-200'})" in r.stderr


def test_meta_without_its_index_says_what_to_pass(written, tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    for f in ("model.ckpt-100.meta", "model.ckpt-100.data-00000-of-00001"):
        shutil.copy(written / "train" / f, d / f)
    line = _error(run_cli("ls", d / "model.ckpt-100.meta"))
    assert "a TF1 graph (.meta, no values) of checkpoint model.ckpt-100" in line
    assert "pass the directory holding model.ckpt-100.index and its .data files" in line
    line = _error(run_cli("plan", d))
    assert f"{d}: holds model.ckpt-100.data-00000-of-00001, model.ckpt-100.meta but no .index file" in line


def test_parent_of_checkpoint_directories_lists_them(written, tmp_path):
    runs = tmp_path / "runs"
    for name in ("b", "a"):
        shutil.copytree(written / "train", runs / name)
    (runs / "logs").mkdir()
    line = _error(run_cli("ls", runs))
    assert line.endswith(f"{runs}: not a checkpoint itself but holds 2 checkpoint directories (a, b); "
                         f"pass one of them, e.g. {runs / 'b'}")
    serving = written / "serving"
    line = _error(run_cli("convert", serving, tmp_path / "o.npz"))
    assert f"holds 2 checkpoint directories (1, 2); pass one of them, e.g. {serving / '2'} (the newest)" in line
    assert not list(tmp_path.glob("o.npz*"))


def test_store_with_arrays_named_like_tf_files_is_not_taken_for_a_tf_checkpoint(tmp_path):
    pytest.importorskip("tensorstore")
    np.savez(tmp_path / "in.npz", **{"x.index": np.arange(3.0), "y.meta": np.ones(2)})
    r = run_cli("convert", tmp_path / "in.npz", tmp_path / "o.zarr", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("ls", tmp_path / "o.zarr", "-q")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in _lines(r.stdout)] == ["x.index", "y.meta"]


# ------------------------------------------------------------------ a missing library

# Runs the CLI with ``BLOCKED`` unimportable, as if its extra were not installed.
_BLOCKING_CLI = textwrap.dedent("""
    import sys
    blocked = sys.argv.pop(1)
    class Blocker:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocker)
    from shardconv.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_without(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKING_CLI, module, *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, extra, what, dest, to", [
    ("tensorstore", "zarr", "Zarr output", "out.zarr", "zarr"),
    ("tensorflow", "tf", "TensorFlow output (--to savedmodel / tf-checkpoint)", "out_sm", "savedmodel"),
])
def test_missing_extra_is_reported_by_plan_and_convert_before_anything_is_written(
        written, tmp_path, module, extra, what, dest, to):
    want = f"shardconv: error: {what} needs the '{module}' package: pip install 'shardconv[{extra}]'"
    src = written / "train" / "model.ckpt-200"
    assert _error(_run_without(module, "convert", src, tmp_path / dest, "--to", to)) == want
    assert _error(_run_without(module, "convert", src, tmp_path / "new" / dest, "--to", to)) == want
    assert _error(_run_without(module, "plan", src, "--to", to)) == want
    assert list(tmp_path.iterdir()) == []  # no DEST, no DEST.partial, no parent directory


# ------------------------------------------------------------------ destination directories

def test_convert_creates_missing_parent_directories(written, tmp_path):
    dest = tmp_path / "models" / "net" / "1" / "weights.npz"
    r = run_cli("convert", written / "train", dest, "-q")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(_kernel(dest), KERNEL[200])


def test_tf_serving_example_of_the_docs_works_in_an_empty_directory(written, tmp_path):
    """docs/savedmodel.md: ``convert CKPT models/mynet --to savedmodel --serving-version 3``."""
    r = run_cli("convert", written / "train", tmp_path / "models" / "mynet", "--to", "savedmodel",
                "--serving-version", "3", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "mynet" / "3" / "saved_model.pb").is_file()
    r = run_cli("verify", tmp_path / "models" / "mynet" / "3", written / "train", "-q")
    assert r.returncode == 0, r.stderr


def test_a_refusal_leaves_no_parent_directory_behind(written, tmp_path):
    dest = tmp_path / "models" / "net" / "weights.npz"
    line = _error(run_cli("convert", written / "train" / "model.ckpt-200", dest, "--max-memory", "1KiB"))
    assert "--max-memory" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ Orbax CheckpointManager steps

def test_orbax_step_is_listed_and_restored_by_checkpoint_manager(written, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    dest = tmp_path / "ckpts"
    for step, tf_step in ((5, 100), (9, 200)):
        r = run_cli("convert", written / "train", dest, "--step", tf_step, "--to", "zarr", "--layout", "orbax",
                    "--orbax-step", step, "-q")
        assert r.returncode == 0, r.stderr
    manager = ocp.CheckpointManager(dest)
    assert list(manager.all_steps()) == [5, 9]
    for step, tf_step in ((5, 100), (9, 200)):
        restored = manager.restore(step, args=ocp.args.StandardRestore())
        np.testing.assert_array_equal(restored["dense"]["kernel"], KERNEL[tf_step])
        assert restored["dense"]["kernel"].dtype == np.float32
        assert int(restored["global_step"]) == 0
    manager.close()
    line = _error(run_cli("convert", written / "train" / "model.ckpt-200", dest, "--to", "zarr",
                          "--layout", "orbax", "--orbax-step", "9"))
    assert "already exists; pass --overwrite" in line
    assert sorted(p.name for p in dest.iterdir()) == ["5", "9"]
    r = run_cli("verify", dest / "5", written / "train", "--step", "100", "-q")
    assert r.returncode == 0, r.stderr


def test_orbax_step_needs_the_orbax_layout(written, tmp_path):
    line = _error(run_cli("convert", written / "train", tmp_path / "o.zarr", "--orbax-step", "3", "-q"))
    assert line.endswith("--orbax-step writes a CheckpointManager step of the Orbax layout; pass --layout orbax")
    assert list(tmp_path.iterdir()) == []
