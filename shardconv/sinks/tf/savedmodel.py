"""The TensorFlow outputs: ``--to savedmodel`` and ``--to tf-checkpoint`` (with or without
``--model-builder``), one sink class whose ``Layout`` (``layout.py``) says where the files
go and which checkpoint key each output gets.

TensorFlow, where a layout needs it, only builds the skeleton (``saved_model.pb`` and the
object graph, variables uninitialised) in ``prepare``; the values stream into a bundle
shardconv writes itself (``bundle.py``): fixed offsets, ``pwrite`` in any order, within
``--max-memory``, deterministic bytes. See docs/savedmodel.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.plan import Chunk, OutputTensor
from ...errors import DestinationError
from ...formats import bundleformat
from ...frontend import option
from ...util import safefs
from ...util.checksums import crc32c
from ...util.dtypes import STRING
from ...util.fileio import fsync_tree
from ..base import Capabilities, Sink, SinkContext, SinkOptions, sink_option
from . import ops
from .bundle import Bundle, Carried
from .layout import Layout, layout_for

#: The work file's format; a partial output of another version is prepared anew.
LAYOUT_VERSION = 2


@dataclass(frozen=True)
class TFOptions(SinkOptions):
    """The options of the TensorFlow outputs (checked by ``layout_for`` before any work)."""

    model_builder: str | None = sink_option(
        None, "build the model with MODULE:FUNCTION (imported from the current directory or PYTHONPATH): "
              "its variables name the checkpoint keys, its signatures serve", metavar="MODULE:FUNCTION")
    model_config: str | None = sink_option(None, "the file passed to --model-builder's function", metavar="FILE")
    serving_version: int | None = sink_option(None, "write DEST/N/ (TF Serving's layout) for --to savedmodel",
                                              metavar="N", parse=int)


class TFSink(Sink):
    """A TF output: keys from its layout, values in a bundle shardconv writes.

    ``prepare`` builds the skeleton (TensorFlow, where the layout needs it) and sizes the data
    file; ``attach`` reopens both without TensorFlow and without changing a byte."""

    Options = TFOptions
    options_help = "TensorFlow output (--to savedmodel / tf-checkpoint)"
    capabilities = Capabilities(dtypes=frozenset(bundleformat.TF_DTYPE_CODES) - {STRING}, piecewise=True)
    receipt_checksum = "crc32c"
    output_kind = "directory"

    def __init__(self, layout: Layout, options: TFOptions | None = None) -> None:
        super().__init__(options)
        self.layout = layout
        self._bundle: Bundle | None = None
        self._doc: Any = None  # the layout prepare recorded (kept in the manifest: attach finds it there)

    def _ctx(self) -> SinkContext:
        assert self.ctx is not None, "open() sets the context"
        return self.ctx

    def options(self) -> dict[str, Any]:
        return self.layout.options()

    def baseline_bytes(self) -> int:
        return ops.TF_IMPORT_BYTES if self.layout.needs_tf else 0

    def scratch_slots(self) -> int:
        return 1  # the index: one data block (256 KiB) and the index block, at finish

    def final_paths(self, dest: Path) -> list[Path]:
        return self.layout.final_paths(dest)

    def leave_out(self, output: OutputTensor) -> str | None:
        if output.dtype in bundleformat.TF_DTYPE_CODES:
            return None
        return f"{output.dtype} has no TensorFlow DataType"

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Dtypes TensorFlow has no code for, names that are not UTF-8, and the layout's own rules."""
        problems = []
        for o in outputs:
            why = self.leave_out(o)
            if why:
                problems.append(f"{o.name!r}: {why}; leave it out or cast it with a rule")
            try:
                o.name.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(f"{o.name!r}: not valid UTF-8 (a lone surrogate); checkpoint keys are UTF-8")
        return problems + self.layout.check_outputs(outputs)

    # -- the partial output

    def _paths(self, out: Path, outputs: list[OutputTensor]) -> dict[str, Any]:
        self.out, self.outputs = out, outputs
        self.work = out.parent / (out.name + ".tfwork")
        return {o.name: [o.dtype, list(o.shape)] for o in outputs}

    def attach(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Reopen the output a ``prepare`` for the same outputs and options made (half-written or
        finished), changing no byte of it; no TensorFlow. Raises: DestinationError where it is not
        there whole."""
        want = self._paths(out, outputs)
        doc = self._layout_doc()
        try:
            same = (doc.get("version"), doc.get("outputs"), doc.get("options")) == (LAYOUT_VERSION, want, self.options())
            self.keys = {k: list(v) for k, v in doc["keys"].items()}
            carried = [Carried.from_json(c) for c in doc["carried"]]
        except (ValueError, TypeError, KeyError, AttributeError):
            same = False
        self._doc = doc
        self._bundle = Bundle(self._prefix(), outputs, self.keys, carried) if same else None
        if self._bundle is None or not self.layout.skeleton_intact(out) or not self._bundle.attach():
            raise DestinationError(f"{out}: cannot attach to this output: its layout, skeleton or carried tensors "
                                   f"are missing or damaged, or it was written for other tensors or options; "
                                   f"rerun with {option('restart')}")

    def _layout_doc(self) -> Any:
        """The layout ``prepare`` recorded: in the work directory beside a partial output, in the
        manifest of a finished one. None if neither has it."""
        for path, key in ((self.work / "layout.json", None), (self.layout.manifest_path(self.out), "tf_layout")):
            try:
                doc = json.loads(path.read_text())
                return doc if key is None else doc[key]
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return None

    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        """The skeleton (TensorFlow, for a layout that needs it), then the values' data file of
        its final size with the carried tensors in place; ``layout.json`` last marks it whole."""
        want = self._paths(out, outputs)
        for p in (self.out, self.work):
            safefs.remove(p)
        self.work.mkdir(parents=True)
        self.out.mkdir(parents=True)
        skel = self.layout.build(self.out, self.work, outputs, self._ctx().source)
        self.keys = skel.keys
        self._bundle = Bundle(self._prefix(), outputs, self.keys, skel.carried)
        self._prefix().parent.mkdir(parents=True, exist_ok=True)
        self._bundle.create(self._ctx().durable)
        self._doc = {"version": LAYOUT_VERSION, "outputs": want, "options": self.options(), "keys": self.keys,
                     "carried": [c.to_json() for c in skel.carried]}
        safefs.write_atomic(self.work / "layout.json", json.dumps(self._doc, sort_keys=True).encode(), fsync=False)

    def _prefix(self) -> Path:
        return self.layout.model_dir(self.out) / self.layout.prefix

    # -- values

    def write(self, chunk: Chunk, data: memoryview, crc: int | None = None) -> int:
        self.write_part(chunk, data)
        return crc32c(data) if crc is None else crc

    def sync(self) -> bool:
        return self._bundle is not None and self._bundle.sync()

    def write_part(self, chunk: Chunk, data: memoryview) -> None:
        assert self._bundle is not None
        self._bundle.write(chunk, data, self._ctx().durable)

    def page_offset(self, chunk: Chunk) -> int | None:
        return self._bundle.page_offset(chunk) if self._bundle is not None else None

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        return self._bundle is not None and self._bundle.check(chunk, receipt)

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
        """The index, the state file, the manifest (a copy, with CRCs and keys); all fsynced when
        durable. Returns the renames that publish DEST."""
        fsync, dest = self._ctx().durable, self._ctx().dest.path
        assert self._bundle is not None
        crcs = self._bundle.finish(receipts, bool(fsync))
        if self.layout.state_file:  # so the directory works as a checkpoint directory
            name = self.layout.prefix
            safefs.write_file(self.out / "checkpoint", (f'model_checkpoint_path: "{name}"\n'
                                                        f'all_model_checkpoint_paths: "{name}"\n').encode(), False)
        tensors = [{**t, "crc32c": crc} for t, crc in zip(manifest["tensors"], crcs)]
        mpath = self.layout.manifest_path(self.out)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        doc = {**manifest, "tensors": tensors, "tf_keys": dict(self.keys), "tf_layout": self._doc}
        safefs.write_file(mpath, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), fsync=False)
        if fsync:
            fsync_tree(self.out)
        return self.layout.moves(self.out, dest)

    def close(self) -> None:
        if self._bundle is not None:
            self._bundle.close()


class SavedModelSink(TFSink):
    """A SavedModel directory (``saved_model.pb`` + ``variables/``), or ``DEST/N/`` with
    ``--serving-version N`` (the TF Serving layout; added beside other versions in DEST)."""

    name = "savedmodel"

    def __init__(self, options: TFOptions | None = None, *, model_builder: str | None = None,
                 model_config: str | os.PathLike | None = None, serving_version: int | None = None) -> None:
        o = options or TFOptions(model_builder=model_builder, model_config=_path_text(model_config),
                                 serving_version=serving_version)
        super().__init__(layout_for("savedmodel", o.model_builder, o.model_config, o.serving_version), o)


class TFCheckpointSink(TFSink):
    """``--to tf-checkpoint``: ``DEST/ckpt.*``, keyed by the output names or, with a model
    builder, as ``tf.train.Checkpoint(model=<built model>)`` saves it."""

    name = "tf-checkpoint"

    def __init__(self, options: TFOptions | None = None, *, model_builder: str | None = None,
                 model_config: str | os.PathLike | None = None, serving_version: int | None = None) -> None:
        o = options or TFOptions(model_builder=model_builder, model_config=_path_text(model_config),
                                 serving_version=serving_version)
        super().__init__(layout_for("tf-checkpoint", o.model_builder, o.model_config, o.serving_version), o)


def _path_text(path: str | os.PathLike | None) -> str | None:
    return os.fspath(path) if path is not None else None


__all__ = ["TFSink", "TFOptions", "SavedModelSink", "TFCheckpointSink"]
