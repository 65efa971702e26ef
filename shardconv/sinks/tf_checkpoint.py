"""A TensorFlow checkpoint written without TensorFlow (``--to tf-checkpoint``).

``DEST/`` holds ``ckpt.data-00000-of-00001`` (every tensor's raw bytes at an offset fixed
by the plan, written with ``pwrite`` in any chunk order, in key order without padding, as
TensorFlow's ``SaveV2`` lays them out), ``ckpt.index`` (the SSTable of entries, written at
``finish`` by ``bundleformat``; each entry's CRC32C combined from the chunks' CRCs), a
``checkpoint`` state file (so ``tf.train.load_checkpoint(DEST)`` and shardconv's reader
accept the directory) and the manifest ``shardconv.json``. For the same tensors the files
are byte-identical to what ``tf.raw_ops.SaveV2`` writes.

Keys are the output names (TF1 name-based: ``tf.compat.v1.train.Saver`` restores them).
When every output is a source tensor under its own raw key (``--names keys``) and the
source is a TF2 checkpoint whose other tensors are only its object graph, that graph is
carried over as the string tensor ``_CHECKPOINTABLE_OBJECT_GRAPH``, so
``tf.train.Checkpoint.restore`` restores it as it restored the source.

With ``--model-builder`` the keys come from the built model, which needs TensorFlow: that
case is the TensorFlow-based sink in ``savedmodel.py``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.plan import Chunk, Copy, OutputTensor
from ..errors import UsageError
from ..formats import bundleformat
from ..util import safefs
from ..util.checksums import combine_crc32c, crc32c, mask
from ..util.fileio import fsync_file, pwrite_all, start_writeback, truncate
from . import filesink
from .base import Sink

PREFIX = "ckpt"
DATA_NAME = f"{PREFIX}.data-00000-of-00001"
INDEX_NAME = f"{PREFIX}.index"
MANIFEST_NAME = "shardconv.json"
from ..formats.bundle_entries import OBJECT_GRAPH_KEY


def tf_checkpoint_sink(model_builder: str | None = None, model_config: str | os.PathLike | None = None,
                       serving_version: int | None = None) -> Sink:
    """The ``--to tf-checkpoint`` sink: this module's writer, or with a model builder the
    TensorFlow-based one (its keys come from the built model)."""
    if serving_version is not None:
        raise UsageError("--serving-version applies to --to savedmodel only")
    if model_builder is None and model_config is None:
        return TFBundleSink()
    from .tf.savedmodel import TFCheckpointSink

    return TFCheckpointSink(model_builder=model_builder, model_config=model_config)


def carried_graph(source: Any, outputs: list[OutputTensor]) -> tuple[tuple[int, ...], list[bytes]] | None:
    """(shape, elements) of the source's object graph when it stays true for the output:
    every output is a source tensor copied under its own key, and every source tensor but
    the graph is an output. Else None (the output is TF1 name-based)."""
    if source is None or not hasattr(source, "read_strings"):
        return None
    infos = {t.name: t for t in source.tensors()}
    graph = infos.get(OBJECT_GRAPH_KEY)
    if graph is None or not graph.is_string:
        return None
    if any(not isinstance(o.producer, Copy) or o.producer.source != o.name for o in outputs):
        return None
    if {o.name for o in outputs} | {OBJECT_GRAPH_KEY} != set(infos):
        return None
    return tuple(graph.shape), source.read_strings(OBJECT_GRAPH_KEY)


class TFBundleSink(Sink):
    """``DEST/ckpt.index`` + ``DEST/ckpt.data-00000-of-00001``, written by shardconv itself."""

    name = "tf-checkpoint"
    output_kind = "directory"

    def __init__(self) -> None:
        self._fd = -1
        self._offsets: list[int] = []
        self._graph: tuple[tuple[int, ...], bytes, int, int] | None = None  # shape, bytes, crc, offset

    def leave_out(self, output: OutputTensor) -> str | None:
        if output.dtype in bundleformat.TF_DTYPE_CODES:
            return None
        return f"{output.dtype} has no TensorFlow DataType"

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Names that cannot be keys (not UTF-8) and dtypes TensorFlow has no code for."""
        problems = []
        for o in outputs:
            why = self.leave_out(o)
            if why:
                problems.append(f"{o.name!r}: {why}; leave it out or cast it with a rule")
            try:
                o.name.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(f"{o.name!r}: not valid UTF-8 (a lone surrogate); checkpoint keys are UTF-8")
        return problems

    def scratch_slots(self) -> int:
        return 1  # the index: one data block (256 KiB) and the index block, at finish

    def open(self, out: Path, outputs: list[OutputTensor], resume: bool) -> None:
        self.out, self.outputs = out, outputs
        self.data_path = out / DATA_NAME
        graph = carried_graph(self.source, outputs)
        graph_bytes, graph_crc = bundleformat.string_tensor(graph[1]) if graph else (b"", 0)
        self._offsets, size = self._layout(outputs, graph is not None, len(graph_bytes))
        self._graph = (graph[0], graph_bytes, graph_crc, self._graph_offset) if graph else None
        exists = resume and self.data_path.is_file()
        if not exists:
            filesink.check_free_space(out.parent, size + 64 * len(outputs) + (1 << 20))
        safefs.make_dir(out)
        for p in out.iterdir():  # what an earlier run (or another writer) left beside the data
            if p.name != DATA_NAME or not exists:
                safefs.remove(p)
        self._fd = safefs.open_file(self.data_path, os.O_RDWR | os.O_CREAT)
        truncate(self._fd, size, self.data_path)
        if graph_bytes:
            pwrite_all(self._fd, graph_bytes, self._graph_offset, self.data_path)

    def _layout(self, outputs: list[OutputTensor], graph: bool, graph_size: int) -> tuple[list[int], int]:
        """Each output's data offset, tensors in key order (the graph among them); the data size.
        Sets the key order (``_keys``) and the graph's offset."""
        keys = sorted([(o.name.encode("utf-8"), i) for i, o in enumerate(outputs)] +
                      ([(OBJECT_GRAPH_KEY.encode(), -1)] if graph else []))
        offsets, pos = [0] * len(outputs), 0
        self._graph_offset = 0
        for _, i in keys:
            if i < 0:
                self._graph_offset, pos = pos, pos + graph_size
            else:
                offsets[i], pos = pos, pos + outputs[i].nbytes
        self._keys = keys
        return offsets, pos

    def write(self, chunk: Chunk, data: memoryview) -> int:
        pos = self._offsets[chunk.index] + chunk.offset
        pwrite_all(self._fd, data, pos, self.data_path)
        if self.durable:
            start_writeback(self._fd, pos, len(data))
        return crc32c(data)

    def check(self, chunk: Chunk, receipt: Any) -> bool:
        if type(receipt) is not int:
            return False  # a receipt of another writer (the TensorFlow-based sink's groups)
        pos = self._offsets[chunk.index] + chunk.offset
        return filesink.range_crc32(self._fd, pos, chunk.length, crc32c) == receipt

    def finish(self, receipts: list[tuple[Chunk, Any]], manifest: dict[str, Any], fsync: bool,
               dest: Path) -> list[tuple[Path, Path]]:
        crcs = filesink.tensor_crcs(receipts, len(self.outputs), combine_crc32c)
        if fsync:
            fsync_file(self._fd, self.data_path)
        self._write_index(crcs, fsync)
        safefs.write_file(self.out / "checkpoint", (f'model_checkpoint_path: "{PREFIX}"\n'
                                                    f'all_model_checkpoint_paths: "{PREFIX}"\n').encode(), fsync)
        manifest = dict(manifest)
        for entry, crc in zip(manifest["tensors"], crcs):
            entry["crc32c"] = crc
        manifest["tf_keys"] = {o.name: [o.name] for o in self.outputs}
        filesink.write_json(self.out / MANIFEST_NAME, manifest, fsync)
        if fsync:
            safefs.fsync_dir(self.out)
        return [(self.out, dest)]

    def _entries(self, crcs: list[int]):
        """(key, serialized entry) in key order, the header first."""
        yield b"", bundleformat.header(1)
        for key, i in self._keys:
            if i < 0:
                shape, data, crc, offset = self._graph
                yield key, bundleformat.entry("string", shape, offset=offset, size=len(data), crc=mask(crc))
            else:
                o = self.outputs[i]
                yield key, bundleformat.entry(o.dtype, o.shape, offset=self._offsets[i], size=o.nbytes,
                                              crc=mask(crcs[i]))

    def _write_index(self, crcs: list[int], fsync: bool) -> None:
        path = self.out / INDEX_NAME
        fd = safefs.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            table = bundleformat.TableWriter(lambda b: pwrite_all(fd, b, table.offset, path))
            for key, value in self._entries(crcs):
                table.add(key, value)
            table.finish()
            if fsync:
                fsync_file(fd, path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
