"""What every sink must do. Subclass ``SinkTests``; set ``suffix``/``to`` and ``read_back``."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from .. import api
from ..errors import DestinationError, DurabilityError, ShardconvError
from .caselog import log_case
from .faults import Fault, injected


def reference_tree() -> dict[str, np.ndarray]:
    """Arrays of many dtypes and shapes (incl. bfloat16, scalars, empty), fixed seed."""
    rng = np.random.default_rng(42)
    tree = {
        "params/dense/kernel": rng.standard_normal((64, 33)).astype(np.float32),
        "params/dense/bias": rng.standard_normal(33).astype(np.float32),
        "params/emb": rng.standard_normal((300, 16)).astype(ml_dtypes.bfloat16),
        "params/half": rng.standard_normal((5, 7)).astype(np.float16),
        "params/f64": rng.standard_normal((3, 2, 4)).astype(np.float64),
        "stats/count": np.array(12345678901, dtype=np.int64),
        "stats/i32": rng.integers(-2**31, 2**31 - 1, size=(17,), dtype=np.int32),
        "stats/u8": rng.integers(0, 255, size=(9, 3), dtype=np.uint8),
        "stats/mask": rng.random((4, 4)) > 0.5,
        "stats/c64": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        "empty": np.zeros((0, 3), np.float32),
        "params/big": rng.standard_normal((512, 1024)).astype(np.float32),  # 2 MiB: many chunks at 1 MiB
    }
    return tree


def write_reference_npz(path: Path, tree: dict[str, np.ndarray]) -> None:
    """np.savez of the tree (what NumPy itself writes; bfloat16 becomes |V2)."""
    np.savez(path, **tree)  # type: ignore[arg-type]  # numpy stubs type the keyword arrays as allow_pickle



#: The environment of a run on an earlier boot of the machine: a resume after it re-checks chunks.
BEFORE_RESTART = {"SHARDCONV_TEST_BOOT_ID": "an-earlier-boot"}

class SinkTests:
    suffix = ".npz"
    to: str | None = None
    #: Sink options for the Python API, and the same as command-line flags.
    sink_options: dict[str, Any] = {}
    cli_flags: list[str] = []
    #: True if the format's bytes are a pure function of the plan (compare files), else values.
    byte_identical = True

    def read_back(self, dest: Path) -> dict[str, np.ndarray]:
        """Read the output with the format's own library, true dtypes restored."""
        raise NotImplementedError

    def snapshot(self, dest: Path) -> Any:
        """What must be identical between an interrupted-and-resumed run and a clean one."""
        if self.byte_identical and dest.is_file():
            return dest.read_bytes()
        return {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in self.read_back(dest).items()}

    def reference(self) -> dict[str, np.ndarray]:
        """The arrays the suite converts; a format that cannot hold some dtypes narrows it."""
        return reference_tree()

    @pytest.fixture
    def source_npz(self, tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
        tree = self.reference()
        path = tmp_path / "in.npz"
        write_reference_npz(path, tree)
        return path, tree

    def convert(self, src: Path, dest: Path, **kw: Any):
        return api.convert(src, dest, to=self.to, sink_options=self.sink_options or None, **kw)

    def test_values_equal_the_source_exactly(self, source_npz, tmp_path):
        src, tree = source_npz
        dest = tmp_path / f"out{self.suffix}"
        self.convert(src, dest, max_memory="8MiB")
        got = self.read_back(dest)
        assert set(got) == set(tree)
        for k, v in tree.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert got[k].tobytes() == v.tobytes(), k

    def test_chunk_size_does_not_change_the_output(self, source_npz, tmp_path):
        src, _ = source_npz
        a, b = tmp_path / f"a{self.suffix}", tmp_path / f"b{self.suffix}"
        self.convert(src, a, max_memory="1MiB")
        self.convert(src, b, max_memory="256MiB")
        assert self.snapshot(a) == self.snapshot(b)

    def test_existing_destination_is_refused_without_overwrite(self, source_npz, tmp_path):
        src, _ = source_npz
        dest = tmp_path / f"out{self.suffix}"
        self.convert(src, dest)
        before = self.snapshot(dest)
        with pytest.raises(DestinationError):
            self.convert(src, dest)
        assert self.snapshot(dest) == before
        self.convert(src, dest, overwrite=True)
        assert self.snapshot(dest) == before

    #: Kill points for the sweep: after a chunk's write, after its journal line, before and
    #: after the final rename. Sinks whose runs are slow (TensorFlow) may use fewer.
    kill_points = ([f"chunk:{k}" for k in (0, 2, 5, 9, 13, 17, 21, 25, 28, 30)] +
                   [f"journal:{k}" for k in (0, 1, 4, 8, 12, 16, 20, 24, 27, 30)] + ["finish", "renamed"])

    #: Name of this sink (and its options) in the README's kill-point figures.
    label: str = ""

    def _log_kill(self, point: str) -> None:
        log = os.environ.get("SHARDCONV_KILL_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{self._label()}\t{point}\n")

    def _label(self) -> str:
        return self.label or self.to or self.suffix.lstrip(".")

    def _kill_at(self, src: Path, dest: Path, point: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "shardconv", "convert", str(src), str(dest), "--max-memory", "1MiB", "--quiet",
                 *self.cli_flags]
        if self.to:
            argv += ["--to", self.to]
        return subprocess.run(argv, env={**os.environ, "SHARDCONV_TEST_KILL": point, **(env or {})}, capture_output=True)

    def test_sigkill_sweep_then_resume_gives_the_same_output(self, source_npz, tmp_path):
        """SIGKILL at every kill point in turn; after each, nothing complete is at DEST early,
        and resuming yields the same output as an uninterrupted run."""
        src, _ = source_npz
        clean = tmp_path / f"clean{self.suffix}"
        self.convert(src, clean, max_memory="1MiB")
        want = self.snapshot(clean)
        survived = 0
        for point in self.kill_points:
            dest = tmp_path / f"out-{point.replace(':', '-')}{self.suffix}"
            proc = self._kill_at(src, dest, point)
            assert proc.returncode == -9, (point, proc.stderr.decode())
            assert dest.exists() == (point == "renamed"), point
            r = self.convert(src, dest, max_memory="1MiB", overwrite=point == "renamed")
            assert point in ("renamed",) or point == "chunk:0" or r.chunks_resumed > 0, point
            assert self.snapshot(dest) == want, point
            assert not Path(str(dest) + ".partial").exists(), point
            survived += 1
            self._log_kill(point)
        assert survived == len(self.kill_points)

    #: Fractions of an uninterrupted run's duration at which the time sweep kills.
    time_kill_fractions = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)

    def test_sigkill_at_times_spread_over_the_run_then_resume(self, source_npz, tmp_path):
        """SIGKILL at moments spread over the conversion (wherever it then is: reading,
        writing, journaling, finishing); resuming yields the same output."""
        _, tree = source_npz
        tree = {**tree, "bulk": np.random.default_rng(3).standard_normal((96, 65536)).astype(np.float32)}
        src = tmp_path / "bulk.npz"
        write_reference_npz(src, tree)  # 24 MiB more: about 30 chunks at 1 MiB
        clean = tmp_path / f"clean{self.suffix}"
        duration = self.convert(src, clean, max_memory="1MiB").seconds  # the engine's run, as the kill timer counts
        want = self.snapshot(clean)
        kills = 0
        for frac in self.time_kill_fractions:
            delay = duration * frac
            for attempt in range(4):  # a run that beat its timer is checked, then retried earlier
                dest = tmp_path / f"out-{frac}-{attempt}{self.suffix}"
                proc = self._kill_at(src, dest, f"after:{delay:.3f}")
                assert proc.returncode in (0, -9), (frac, proc.stderr.decode())
                if proc.returncode == -9:
                    break
                assert self.snapshot(dest) == want, frac
                delay /= 2
            else:
                raise AssertionError(f"the conversion always finished before {delay * 2:.3f} s")
            kills += 1
            self.convert(src, dest, max_memory="1MiB", overwrite=dest.exists())
            assert self.snapshot(dest) == want, frac
            assert not Path(str(dest) + ".partial").exists(), frac
            self._log_kill(f"time:{frac}")
        assert kills == len(self.time_kill_fractions)

    def test_repeated_kills_on_one_destination_then_resume(self, source_npz, tmp_path):
        src, _ = source_npz
        clean = tmp_path / f"clean{self.suffix}"
        self.convert(src, clean, max_memory="1MiB")
        dest = tmp_path / f"out{self.suffix}"
        for point in ("journal:3", "chunk:9", "journal:15", "finish"):
            assert self._kill_at(src, dest, point).returncode == -9, point
            assert not dest.exists(), point
        r = self.convert(src, dest, max_memory="1MiB")
        assert r.chunks_resumed > 15
        assert self.snapshot(dest) == self.snapshot(clean)

    # -- a damaged partial output, and the OS refusing a write, an fsync, an open, a rename --

    def corrupt_partial(self, out: Path) -> None:
        """Damage one written chunk of the partial output ``out`` (``DEST.partial/NAME``, killed
        after every chunk was journaled): by default one byte in the middle of its largest file."""
        files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
        largest = max(files, key=lambda p: p.stat().st_size)
        with open(largest, "r+b") as f:
            f.seek(largest.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))

    def test_a_corrupted_chunk_of_the_partial_is_detected_and_redone(self, source_npz, tmp_path):
        """Killed once every chunk is journaled, the machine restarted (another boot id), a chunk
        of the partial output then damaged: the resume re-checks every journaled chunk, redoes the
        damaged one, and the output is identical. (On the same boot nothing is re-read.)"""
        src, _ = source_npz
        clean = tmp_path / f"clean{self.suffix}"
        self.convert(src, clean, max_memory="1MiB")
        dest = tmp_path / f"out{self.suffix}"
        assert self._kill_at(src, dest, "finish", env=BEFORE_RESTART).returncode == -9
        self.corrupt_partial(Path(f"{dest}.partial") / dest.name)
        r = self.convert(src, dest, max_memory="1MiB")
        assert r.chunks_written >= 1 and r.chunks_resumed >= 1, (r.chunks_written, r.chunks_resumed)
        assert self.snapshot(dest) == self.snapshot(clean)
        assert not Path(f"{dest}.partial").exists()
        log_case("corrupt-partial", self._label())

    def convert_faulty(self, src: Path, dest: Path, faults: list[Fault], **kw: Any) -> tuple[Any, list[int]]:
        """Convert with ``faults`` injected where the conversion runs: (the ShardconvError it
        raised, or None; how many calls each fault matched). A sink whose ``convert`` runs in
        another process overrides this to install them there (``faults.injected``)."""
        with injected(faults) as counts:
            try:
                self.convert(src, dest, max_memory="1MiB", **kw)
            except ShardconvError as e:
                return e, counts
        return None, counts

    def _faulty_run(self, src: Path, dest: Path, faults: list[Fault]) -> tuple[DestinationError, list[int]]:
        """A conversion under ``faults`` must raise a DestinationError of one line naming the
        destination, and leave nothing at DEST."""
        e, counts = self.convert_faulty(src, dest, faults)
        assert isinstance(e, DestinationError), (e, counts)
        msg = str(e)
        assert "\n" not in msg and dest.name in msg, msg
        assert not os.path.lexists(dest), msg
        return e, counts

    def _clean_run(self, src: Path, tmp_path: Path) -> Any:
        """The snapshot of an uninterrupted run; skips where the faults cannot reach the
        conversion (it runs in another process and ``convert_faulty`` is not overridden)."""
        clean = tmp_path / f"clean{self.suffix}"
        _, (staged,) = self.convert_faulty(src, clean, [Fault("open", after=None, path=f"{clean.name}.partial")])
        if not staged:
            pytest.skip(f"{self._label()}: convert runs in another process; override convert_faulty")
        return self.snapshot(clean)

    @pytest.mark.parametrize("fn,err", [("pwrite", errno.ENOSPC), ("pwrite", errno.EIO), ("write", errno.ENOSPC)])
    def test_a_write_error_is_one_line_and_the_next_run_resumes(self, source_npz, tmp_path, fn, err):
        """os.pwrite or os.write fails (a full disk, an I/O error) from halfway through the calls
        a run makes: one line, nothing at DEST, the partial kept; the next run resumes it."""
        src, _ = source_npz
        want = self._clean_run(src, tmp_path)
        _, (calls,) = self.convert_faulty(src, tmp_path / f"counted{self.suffix}", [Fault(fn, after=None)])
        if calls < 2:
            pytest.skip(f"{self._label()} writes through a native library, not os.{fn}")
        dest = tmp_path / f"out{self.suffix}"
        e, _ = self._faulty_run(src, dest, [Fault(fn, err, after=calls // 2)])
        assert os.strerror(err) in str(e), str(e)
        assert (Path(f"{dest}.partial") / "journal.jsonl").exists()
        r = self.convert(src, dest, max_memory="1MiB")
        assert r.chunks_resumed > 0 and self.snapshot(dest) == want
        log_case(f"fault-{fn}-{errno.errorcode[err]}", self._label())

    def test_a_failed_fsync_of_the_output_is_one_line_and_discards_the_partial(self, source_npz, tmp_path):
        """os.fsync fails (EIO) on the output being built: after a failed fsync nothing written
        is trusted, so the partial is discarded and the next run starts over."""
        src, _ = source_npz
        want = self._clean_run(src, tmp_path)
        dest = tmp_path / f"out{self.suffix}"
        e, (refused,) = self._faulty_run(src, dest, [Fault("fsync", path=str(Path(f"{dest}.partial") / dest.name))])
        assert refused, "the sink never fsyncs its output"
        assert isinstance(e, DurabilityError) and "fsync failed" in str(e), str(e)
        assert not os.path.lexists(f"{dest}.partial"), "the partial was kept after a failed fsync"
        r = self.convert(src, dest, max_memory="1MiB")
        assert r.chunks_resumed == 0 and self.snapshot(dest) == want
        log_case("fault-fsync", self._label())

    @pytest.mark.parametrize("what", ["lock", "output"])
    def test_an_open_that_fails_is_one_line(self, source_npz, tmp_path, what):
        """os.open fails (EMFILE) for the lock, or for every path of the output being built."""
        src, _ = source_npz
        want = self._clean_run(src, tmp_path)
        dest = tmp_path / f"out{self.suffix}"
        where = f"{dest.name}.partial/{'lock' if what == 'lock' else dest.name}"
        gap = KNOWN_GAPS.get((self._label(), f"open-{what}"))
        if gap:
            err, _ = self.convert_faulty(src, dest, [Fault("open", errno.EMFILE, path=where)])
            if not isinstance(err, DestinationError):
                pytest.xfail(f"{gap}: {err!r}")
        e, (refused,) = self._faulty_run(src, dest, [Fault("open", errno.EMFILE, path=where)])
        assert refused and os.strerror(errno.EMFILE) in str(e), str(e)
        self.convert(src, dest, max_memory="1MiB")
        assert self.snapshot(dest) == want
        log_case(f"fault-open-{what}", self._label())

    def test_a_rename_that_fails_is_one_line_and_keeps_the_output(self, source_npz, tmp_path):
        """os.replace and os.rename fail (EIO) for every path outside ``DEST.partial``: publishing
        over an existing output with --overwrite fails in one line, the old output intact, and
        the next run publishes the kept partial without rewriting it."""
        src, _ = source_npz
        want = self._clean_run(src, tmp_path)
        dest = tmp_path / f"out{self.suffix}"
        self.convert(src, dest, max_memory="1MiB")
        outside = f"{dest.name}.partial"
        e, counts = self.convert_faulty(src, dest, [Fault("replace", exclude=outside), Fault("rename", exclude=outside)],
                                        overwrite=True)
        assert self.snapshot(dest) == want
        if not any(counts):  # published by renameat2 alone (a directory): nothing went through os.*
            assert e is None, str(e)
            return
        assert isinstance(e, DestinationError) and "\n" not in str(e) and os.strerror(errno.EIO) in str(e), e
        r = self.convert(src, dest, max_memory="1MiB", overwrite=True)
        assert self.snapshot(dest) == want and r.chunks_written == 0
        log_case("fault-rename", self._label())

    def test_attaching_to_a_committed_output_changes_no_byte(self, source_npz, tmp_path):
        """A sink opened with ``resume`` on a finished output (a late duplicate worker, a
        resume) and closed again never truncates, deletes or rewrites anything of it (it may
        refuse to attach, in one line)."""
        from ..core.destination import Destination, SinkContext
        from ..sinks import sink_for

        src, _ = source_npz
        self._clean_run(src, tmp_path)  # skips where the sink runs in another process
        dest = tmp_path / f"clean{self.suffix}"
        sink = sink_for(dest, self.to, **self.sink_options)
        before = {str(p): _contents(p) for p in sink.final_paths(dest)}
        outputs = api.plan(src).leave_out(sink.leave_out).outputs
        chunk_bytes = self.convert(src, tmp_path / f"again{self.suffix}", max_memory="1MiB").chunk_bytes
        try:  # a sink may refuse to attach (one line), but never changes what it found
            sink.open(dest, outputs, SinkContext(Destination.parse(dest), chunk_bytes=chunk_bytes, resume=True))
        except DestinationError as e:
            assert "\n" not in str(e), str(e)
        finally:
            sink.close()
        assert {str(p): _contents(p) for p in sink.final_paths(dest)} == before

    # -- the filesystem: planted links, races, the input, refusals before the first byte ------

    def _output_kind(self, dest: Path) -> str:
        from ..sinks import sink_for

        return sink_for(dest, self.to, **self.sink_options).output_kind

    def test_planted_link_at_the_staging_directory_is_refused_and_its_target_untouched(self, source_npz, tmp_path):
        src, _ = source_npz
        target = _plant(tmp_path / "precious", "directory")
        dest = tmp_path / f"out{self.suffix}"
        Path(f"{dest}.partial").symlink_to(target)
        with pytest.raises(DestinationError, match="symbolic link"):
            self.convert(src, dest)
        assert _contents(target) == PLANTED["directory"] and not os.path.lexists(dest)
        log_case("planted-link", self._label())

    def test_planted_link_at_the_lock_is_refused_and_its_target_untouched(self, source_npz, tmp_path):
        src, _ = source_npz
        victim = _plant(tmp_path / "victim", "file")
        dest = tmp_path / f"out{self.suffix}"
        Path(f"{dest}.partial").mkdir()
        Path(f"{dest}.partial", "lock").symlink_to(victim)
        with pytest.raises(DestinationError, match="symbolic link"):
            self.convert(src, dest)
        assert _contents(victim) == PLANTED["file"] and not os.path.lexists(dest)
        log_case("planted-link", self._label())

    @pytest.mark.parametrize("point", ["lock", "finish"])
    def test_race_destination_published_by_another_writer_meanwhile_is_never_replaced(self, source_npz, tmp_path, point):
        """Another writer publishes DEST after this run checked it: just after the lock is
        taken, or just before the final rename. Without --overwrite it is never replaced."""
        src, tree = source_npz
        dest = tmp_path / f"out{self.suffix}"
        kind = self._output_kind(dest)
        _plant(Path(f"{dest}.race"), kind)
        proc = self._kill_at(src, dest, f"race:{point}")
        err = proc.stderr.decode()
        errors = [ln for ln in err.splitlines() if ln.startswith("shardconv: error: ")]
        assert proc.returncode == 1 and len(errors) == 1 and "--overwrite" in errors[0] and "Traceback" not in err, err
        assert _contents(dest) == PLANTED[kind]
        assert os.path.lexists(f"{dest}.partial") == (point == "finish")  # a finished output is kept
        if point == "finish":
            r = self.convert(src, dest, max_memory="1MiB", overwrite=True)
            assert r.chunks_written == 0
            got = self.read_back(dest)
            assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in tree.items()}
        log_case("race", self._label())

    def test_output_over_around_or_inside_the_input_is_refused(self, source_npz, tmp_path):
        src, _ = source_npz
        holder = tmp_path / f"holder{self.suffix}"
        holder.mkdir()
        inner = holder / "in.npz"
        inner.write_bytes(src.read_bytes())
        split = tmp_path / "split"
        api.convert(src, split, to="npz", sink_options={"max_file_size": 1 << 20})
        before = {"holder": _contents(holder), "split": _contents(split)}
        cases = [(inner, holder, "would hold the input"), (split, split / f"out{self.suffix}", "inside the input")]
        if self.to is not None or self.suffix == ".npz":
            cases.append((inner, inner, "is the input"))
        for s, d, why in cases:
            with pytest.raises(DestinationError, match=why):
                self.convert(s, d, overwrite=True)
        assert {"holder": _contents(holder), "split": _contents(split)} == before
        assert not list(tmp_path.glob("**/*.partial"))
        log_case("input-overlap", self._label())

    def test_refusals_before_the_first_byte_leave_no_partial(self, source_npz, tmp_path):
        """A too-small budget, or --overwrite of something of the other kind (a file where the
        output is a directory, or the reverse): refused before the lock, nothing left behind."""
        from ..errors import BudgetError

        src, _ = source_npz
        dest = tmp_path / f"out{self.suffix}"
        with pytest.raises(BudgetError, match="too small"):
            self.convert(src, dest, max_memory="16KiB")
        assert not os.path.lexists(f"{dest}.partial") and not os.path.lexists(dest)
        other = "file" if self._output_kind(dest) == "directory" else "directory"
        _plant(dest, other)
        with pytest.raises(DestinationError, match=f"is a {other}"):
            self.convert(src, dest, overwrite=True)
        assert _contents(dest) == PLANTED[other] and not os.path.lexists(f"{dest}.partial")

    def test_link_at_the_destination_is_replaced_as_a_link_never_followed(self, source_npz, tmp_path):
        src, tree = source_npz
        dest = tmp_path / f"out{self.suffix}"
        kind = self._output_kind(dest)
        target = _plant(tmp_path / "target", kind)
        dest.symlink_to(target)
        with pytest.raises(DestinationError, match="already exists"):
            self.convert(src, dest)
        self.convert(src, dest, overwrite=True)
        assert not dest.is_symlink() and _contents(target) == PLANTED[kind]
        got = self.read_back(dest)
        assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in tree.items()}
        log_case("planted-link", self._label())


#: Faults a sink is known to report wrongly, by (label, case): the fix is requested from the
#: sink's owner; the case xfails while it still fails that way, and passes once fixed.
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("savedmodel", "open-output"): "sinks/tf/layout.read_bundle reports its own skeleton index that cannot be "
                                   "opened as a FormatError (a source error), not a DestinationError",
}


#: What the filesystem tests plant where shardconv must not write: a directory or a file.
PLANTED: dict[str, Any] = {"directory": {"a": b"precious a\n", "sub/b": b"precious b\n"}, "file": b"precious\n"}


def _plant(path: Path, kind: str) -> Path:
    """Write ``PLANTED[kind]`` at ``path``."""
    if kind == "file":
        path.write_bytes(PLANTED["file"])
        return path
    for rel, data in PLANTED["directory"].items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def _contents(path: Path) -> Any:
    """A file's bytes, or a directory's files by relative path (links not followed)."""
    if not path.is_dir():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
