"""The TensorFlow-built outputs: ``--to savedmodel`` and ``--to tf-checkpoint --model-builder``.

One sink class; what differs between the two is its ``Layout`` (``layout.py``): where the
files go and how the skeleton gives each output its checkpoint keys. See docs/savedmodel.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.plan import Chunk, OutputTensor
from ...util import safefs
from ..base import Sink, SinkContext, SinkOptions, sink_option
from . import groups, ops
from .layout import Carried, Layout, layout_for

LAYOUT_VERSION = 1


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
    """A TF output whose keys come from a skeleton TensorFlow builds (see the layout).

    Follows the ``SinkContext`` contract (``open(out, outputs, ctx)``, ``finish(receipts,
    manifest)``) and, until the engine moves to it, the older call forms as well."""

    Options = TFOptions
    output_kind = "directory"

    def __init__(self, layout: Layout, options: TFOptions | None = None) -> None:
        super().__init__(options)
        self.layout = layout
        self._groups: groups.Groups | None = None
        self._ctx: tuple[bool, int, Any] = (True, 0, None)  # durable, chunk bytes, source

    def options(self) -> dict[str, Any]:
        return self.layout.options()

    def baseline_bytes(self) -> int:
        return ops.TF_IMPORT_BYTES

    def scratch_slots(self) -> int:
        return 1  # the group buffer

    def final_paths(self, dest: Path) -> list[Path]:
        return self.layout.final_paths(dest)

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        return self.layout.check_outputs(outputs)

    def _final_prefix(self) -> Path:
        return self.layout.model_dir(self.out) / self.layout.prefix

    # -- open

    def open(self, out: Path, outputs: list[OutputTensor], ctx: SinkContext | None = None,
             resume: bool | None = None) -> None:
        """Build the skeleton and lay out the values (``prepare``), or attach to a partial output."""
        if ctx is not None:
            self.ctx = ctx
            self._ctx = (ctx.durable, ctx.chunk_bytes, ctx.source)
            resume = ctx.resume
        else:  # the engine before SinkContext set these attributes
            self._ctx = (self.durable, self.chunk_bytes, self.source)
        if resume and self.attach(out, outputs):
            return
        self.prepare(out, outputs)

    def attach(self, out: Path, outputs: list[OutputTensor]) -> bool:  # type: ignore[override]
        """Reopen the partial output a ``prepare`` for the same outputs and options made; False
        where nothing usable is there (then ``open`` prepares anew)."""
        self.out, self.outputs = out, outputs
        self.work = out.parent / (out.name + ".tfwork")
        want = {o.name: [o.dtype, list(o.shape)] for o in outputs}
        doc = groups.read_json(self.work / "layout.json")
        return (isinstance(doc, dict) and doc.get("version") == LAYOUT_VERSION and doc.get("outputs") == want
                and doc.get("options") == self.options() and self._reload(doc))

    def prepare(self, out: Path, outputs: list[OutputTensor]) -> None:
        """Build the skeleton (TensorFlow) and an empty partial output for the values."""
        self.out, self.outputs = out, outputs
        self.work = out.parent / (out.name + ".tfwork")
        want = {o.name: [o.dtype, list(o.shape)] for o in outputs}
        for p in (self.out, self.work):
            safefs.remove(p)
        (self.work / "groups").mkdir(parents=True)
        self.out.mkdir(parents=True)
        skel = self.layout.build(self.out, self.work, outputs)
        self.keys, self.carry = skel.keys, [c.key for c in skel.carried]
        groups.save_carried(skel.carried, self.work / "carry")
        groups.write_json(self.work / "layout.json", {"version": LAYOUT_VERSION, "outputs": want,
                                                      "options": self.options(), "keys": self.keys,
                                                      "carry": self.carry})
        self._groups = self._new_groups()

    def _new_groups(self) -> groups.Groups:
        g = groups.Groups(self.work, self.outputs, self.keys, self.out)
        g.durable, g.chunk_bytes = self._ctx[0], self._ctx[1]
        return g

    def _reload(self, doc: dict[str, Any]) -> bool:
        self.keys = {k: list(v) for k, v in doc["keys"].items()}
        self.carry = list(doc["carry"])
        if not self.out.is_dir():
            return False
        self._groups = self._new_groups()
        return self._groups.reload(self._final_prefix(), bool(self.carry))

    # -- values

    def write(self, chunk: Chunk, data: memoryview) -> Any:
        assert self._groups is not None
        return self._groups.write(chunk, data)

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        return self._groups is not None and self._groups.check(chunk, receipt)

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any],
               fsync: bool | None = None, dest: Path | None = None) -> list[tuple[Path, Path]]:
        """Merge the values, write the manifest (a copy), fsync; the renames that publish DEST."""
        if self.ctx is not None:
            fsync, dest = self.ctx.durable, self.ctx.dest.path
        assert self._groups is not None and dest is not None
        self._groups.merge(receipts, self._final_prefix(), bool(self.carry))
        if self.layout.state_file:  # so the directory works as a checkpoint directory
            name = self.layout.prefix
            safefs.write_file(self.out / "checkpoint", (f'model_checkpoint_path: "{name}"\n'
                                                        f'all_model_checkpoint_paths: "{name}"\n').encode(), False)
        manifest = {**manifest, "tf_keys": dict(self.keys)}
        mpath = self.layout.manifest_path(self.out)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        safefs.write_file(mpath, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), fsync=False)
        if fsync:
            fsync_tree(self.out)
        return self.layout.moves(self.out, dest)

    def close(self) -> None:
        if self._groups is not None:
            self._groups.close()


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (DurabilityError naming the one that fails)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            safefs.fsync_path(Path(dirpath) / f)
        safefs.fsync_path(dirpath, directory=True)


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
    """``--to tf-checkpoint --model-builder``: ``DEST/ckpt.*`` keyed as
    ``tf.train.Checkpoint(model=<built model>)`` saves it."""

    name = "tf-checkpoint"

    def __init__(self, options: TFOptions | None = None, *, model_builder: str | None = None,
                 model_config: str | os.PathLike | None = None) -> None:
        o = options or TFOptions(model_builder=model_builder, model_config=_path_text(model_config))
        super().__init__(layout_for("tf-checkpoint", o.model_builder, o.model_config, o.serving_version), o)


def _path_text(path: str | os.PathLike | None) -> str | None:
    return os.fspath(path) if path is not None else None


__all__ = ["TFSink", "SavedModelSink", "TFCheckpointSink", "Carried"]
