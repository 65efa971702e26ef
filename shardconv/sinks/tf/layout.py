"""Where a TF output's values go: the ``Layout`` strategies and the skeleton they build.

A layout decides the output's shape on disk (the model directory, the bundle prefix inside
it, the manifest's place, the renames that publish it) and, before any value is written,
each output tensor's checkpoint key(s) and the tensors carried over unchanged (the object
graph; a builder's counters and tables). Three layouts:

* ``NameLayout`` (``--to tf-checkpoint``): keys are the output names; nothing is built.
* ``CheckpointLayout`` (``--to tf-checkpoint --model-builder``): TensorFlow writes
  ``tf.train.Checkpoint(model=<built model>)`` with the model's initial values; its keys.
* ``SavedModelLayout`` (``--to savedmodel``): ``tf.saved_model.save`` of a skeleton of
  ``UninitializedVariable``s (or of the built model) writes ``saved_model.pb``; its keys.

The skeleton's checkpoint is read back without TensorFlow (``formats/bundle_entries``,
``sources/tf_object_graph``); its variables' values are never used.
"""
from __future__ import annotations

import gc
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.plan import Copy, OutputTensor
from ...errors import ChecksumError, DestinationError, FormatError, PlanError, UnsupportedError, UsageError
from ...formats import bundleformat
from ...formats.bundle_entries import OBJECT_GRAPH_KEY, Entry, EntryReader
from ...formats.sstable import SSTable
from ...formats.wire import as_int64, fields
from ...frontend import option, option_name
from ...mapping.rules import rename_rule
from ...sources import tf_object_graph
from ...util import safefs
from ...util.checksums import crc32c, mask
from ...util.dtypes import STRING
from ...util.fileio import open_read
from .bundle import Carried

MANIFEST_NAME = "shardconv.json"
#: Dtypes TF 2.21 saves (SaveV2) but cannot restore into a variable (no AssignVariableOp kernel).
NO_VARIABLE_DTYPES = frozenset({"float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz"})
#: TensorFlow's rule for a root name scope, which a SavedModel variable's name must pass
#: (``_VALID_OP_NAME_REGEX``, tensorflow/python/framework/ops.py; a backslash is refused by
#: shardconv's own name check before this one).
VALID_VARIABLE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")
#: Largest tensor of a skeleton's checkpoint carried over as it is (the object graph of a
#: large model is a few MiB); a builder whose model holds more non-variable state is refused.
MAX_CARRIED_BYTES = 64 << 20


@dataclass
class Skeleton:
    """What a layout fixes before values stream: output name -> checkpoint keys, and the
    tensors carried over."""
    keys: dict[str, list[str]]
    carried: list[Carried] = field(default_factory=list)


# --------------------------------------------------------------------------- name checks (no TF)

def variable_name_problem(name: str) -> str | None:
    """Why TensorFlow refuses ``name`` as a variable name (its root name-scope rule,
    ``_VALID_OP_NAME_REGEX`` in tensorflow/python/framework/ops.py), with a rule that fixes it."""
    if VALID_VARIABLE_NAME.fullmatch(name):
        return None
    fixed = re.sub(r"[^A-Za-z0-9_./>-]", "_", name).lstrip("_>-")
    if not VALID_VARIABLE_NAME.fullmatch(fixed):
        fixed = "v_" + fixed.lstrip("/")
    return (f"{name!r} is not a valid TensorFlow variable name ([A-Za-z0-9.][A-Za-z0-9_./>-]*); "
            f"rename it with a rule: {rename_rule(name, fixed)}")


def skeleton_problems(names: list[str]) -> list[str]:
    """Names that cannot be nested modules: a tensor that is also a module, a reserved name."""
    problems = []
    tensors = set(names)
    for name in names:
        parts = name.split("/")
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if parent in tensors:
                problems.append(f"{parent!r} is a tensor and also holds {name!r}; a SavedModel attribute cannot be "
                                f"both (rename one with {option_name('rules')})")
                tensors.discard(parent)
        if parts[0] == "signatures":
            problems.append(f"{name!r}: the top-level name 'signatures' is reserved in a SavedModel "
                            f"(rename with {option_name('rules')})")
    return problems


def savedmodel_problems(outputs: list[OutputTensor]) -> list[str]:
    """Every reason the outputs cannot be the variables of a skeleton SavedModel, one line each."""
    problems = [p for o in outputs if (p := variable_name_problem(o.name))]
    problems += skeleton_problems([o.name for o in outputs])
    bad = [o for o in outputs if o.dtype in NO_VARIABLE_DTYPES]
    if bad:
        problems.append(f"{len(bad)} tensor(s) of dtypes TensorFlow cannot load into a variable "
                        f"({', '.join(sorted({o.dtype for o in bad}))}): {', '.join(repr(o.name) for o in bad[:5])}"
                        f"{', ...' if len(bad) > 5 else ''}; cast them with a rule or use "
                        f"{option('to', 'tf-checkpoint')}")
    return problems


# --------------------------------------------------------------------------- the skeleton's checkpoint (no TF)

def read_bundle(prefix: Path) -> dict[str, Entry]:
    """The entries of a single-shard bundle TensorFlow just wrote (the skeleton's). Raises:
    DestinationError (it is part of the output being built, not an input) naming the file."""
    where = f"{prefix}.index"
    entries: dict[str, Entry] = {}
    read = EntryReader(where)
    try:
        with SSTable(where) as table:
            for key, value in table.items():
                if not key:
                    shards = [as_int64(v) for n, w, v in fields(value, where) if n == 1 and w == 0]
                    if shards and shards[0] != 1:
                        raise DestinationError(f"{where}: the skeleton's checkpoint has {shards[0]} shards, "
                                               "expected 1")
                else:
                    entries[key.decode("utf-8")] = read(key.decode("utf-8"), value)
    except (FormatError, UnsupportedError, ChecksumError, UnicodeDecodeError) as e:
        raise DestinationError(f"the skeleton TensorFlow wrote cannot be read back: {e}") from None
    return entries


def read_carried(prefix: Path, entry: Entry) -> Carried:
    """The stored bytes of one tensor of the skeleton's checkpoint, checked against its CRC."""
    path = f"{prefix}.data-00000-of-00001"
    if entry.size > MAX_CARRIED_BYTES:
        raise DestinationError(f"{path}: {entry.name!r} ({entry.size} bytes) is too large to carry over")
    fd = open_read(path, DestinationError, "skeleton data file")
    try:
        data = os.pread(fd, entry.size, entry.offset)
    finally:
        os.close(fd)
    try:
        if entry.dtype == STRING:  # its CRC covers the lengths as integers (see bundleformat.string_tensor)
            again, crc = bundleformat.string_tensor(bundleformat.string_elements(data, math.prod(entry.shape)))
            ok = again == data
        else:
            crc, ok = crc32c(data), True
    except ValueError:
        ok = False
    if not ok or len(data) != entry.size or (entry.crc is not None and mask(crc) != entry.crc):
        raise DestinationError(f"{path}: {entry.name!r} does not match its index entry")
    return Carried.of(entry.name, entry.dtype, entry.shape, data, crc)


def object_graph(prefix: Path, entries: dict[str, Entry]) -> list[tf_object_graph.Node]:
    """The skeleton's object graph, decoded by shardconv's own reader."""
    data = read_carried(prefix, entries[OBJECT_GRAPH_KEY]).data
    assert data is not None
    blob = bundleformat.string_elements(data, 1)[0]
    return tf_object_graph.parse(blob, str(prefix))


def variable_keys(nodes: list[tf_object_graph.Node], strip: str,
                  rename: Callable[[str, str], str]) -> dict[str, list[str]]:
    """Variable name -> its checkpoint keys: each variable named by its shortest attribute path
    from the root (``strip`` removed; nodes outside ``strip`` are the checkpoint's own state,
    carried as they are), then by ``rename`` (Keras paths of a builder's model)."""
    paths = tf_object_graph.all_paths(nodes, limit=1)
    keys: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        for attr, _, key in node.attributes:
            if attr != "VARIABLE_VALUE" or node.id not in paths:
                continue
            path = name = paths[node.id][0]
            if strip:
                if not name.startswith(strip):
                    continue
                name = name[len(strip):]
            keys[rename(path, name)].append(key)
    return keys


def builder_problems(var_keys: dict[str, list[str]], entries: dict[str, Entry],
                     outputs: list[OutputTensor]) -> list[str]:
    """Model variables without a tensor, tensors without a variable, dtype/shape mismatches."""
    outs = {o.name: o for o in outputs}
    problems = []
    missing, unused = sorted(set(var_keys) - set(outs)), sorted(set(outs) - set(var_keys))
    if missing:
        problems.append(f"{len(missing)} model variable(s) get no converted tensor: {', '.join(missing[:12])}"
                        + (", ..." if len(missing) > 12 else ""))
    if unused:
        problems.append(f"{len(unused)} converted tensor(s) match no model variable: {', '.join(unused[:12])}"
                        + (", ..." if len(unused) > 12 else "")
                        + f" (rename them with {option_name('rules')}, or leave them out with "
                          f"{option('drop_optimizer')} / drop rules)")
    for name in sorted(set(var_keys) & set(outs)):
        e = next((entries[k] for k in var_keys[name] if k in entries), None)
        o = outs[name]
        if e is not None and (e.dtype, tuple(e.shape)) != (o.dtype, tuple(o.shape)):
            problems.append(f"{name!r}: the model variable is {e.dtype}{list(e.shape)}, the tensor is "
                            f"{o.dtype}{list(o.shape)}")
    return problems


def match_skeleton(prefix: Path, outputs: list[OutputTensor], builder: str | None, strip: str,
                   rename: Callable[[str, str], str]) -> Skeleton:
    """Match the skeleton checkpoint's variables to the outputs by name; carry the rest.

    With a builder every model variable must get a tensor and every tensor a variable (all
    problems reported at once); without one a missing variable is a bug of the skeleton."""
    entries = read_bundle(prefix)
    var_keys = variable_keys(object_graph(prefix, entries), strip, rename)
    if builder is not None:
        problems = builder_problems(var_keys, entries, outputs)
        if problems:
            raise PlanError(problems, where=f"--model-builder {builder}")
    missing = sorted({o.name for o in outputs} - set(var_keys))
    if missing:
        raise DestinationError(f"SavedModel skeleton lacks variables for {missing[:5]}")
    keys = {o.name: sorted(var_keys[o.name]) for o in outputs}
    used = {k for ks in keys.values() for k in ks}
    carried = [read_carried(prefix, entries[k]) for k in sorted(entries) if k not in used]
    return Skeleton(keys, carried)


def keras_rename(root: Any, model: Any, outputs: list[OutputTensor], save_type: str) -> Callable[[str, str], str]:
    """``rename`` for ``match_skeleton`` with a builder: a Keras variable's ``path`` (in the form
    ``shardconv ls`` lists a TF checkpoint's weights when the outputs are named that way)."""
    from . import ops

    names = ops.keras_variable_paths(model)
    if not names:
        return _same_name
    unique = sorted(set(names.values()))
    listed = dict(zip(unique, tf_object_graph.strip_model_scope(unique)))
    outs = {o.name for o in outputs}
    if len(outs.intersection(listed.values())) > len(outs.intersection(unique)):
        names = {k: listed[v] for k, v in names.items()}
    cache: dict[int, dict[str, Any]] = {}

    def rename(path: str, name: str) -> str:
        try:
            obj = ops.python_object(root, path.split("/") if path else [], save_type, cache)
        except (KeyError, AttributeError, TypeError, IndexError, ValueError):
            return name
        return names.get(id(obj), name)
    return rename


# --------------------------------------------------------------------------- the layouts

class Layout:
    """Where a TF output's files go and how its keys are found (see the module docstring)."""

    #: The bundle prefix inside the model directory.
    prefix = "ckpt"
    #: Writes a ``checkpoint`` state file beside the bundle (a checkpoint directory).
    state_file = True
    needs_tf = False

    def options(self) -> dict[str, Any]:
        """Options that change the output bytes (recorded in the journal)."""
        return {}

    def model_dir(self, root: Path) -> Path:
        """The directory (under the output's root) that holds the model: the root, or ``N/``."""
        return root

    def final_paths(self, dest: Path) -> list[Path]:
        """Every path the committed output occupies (``Sink.final_paths``)."""
        return [dest]

    def manifest_path(self, root: Path) -> Path:
        """Where the manifest goes in the output rooted at ``root``."""
        return self.model_dir(root) / MANIFEST_NAME

    def moves(self, out: Path, dest: Path) -> list[tuple[Path, Path]]:
        """The renames that publish the staged output ``out`` at ``dest``."""
        return [(out, dest)]

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Problems the layout itself has with the outputs (names), one line each."""
        return []

    def build(self, out: Path, work: Path, outputs: list[OutputTensor], source: Any = None) -> Skeleton:
        """Fix the keys (and write the skeleton files into ``out``); nothing of it in memory after."""
        return Skeleton({o.name: [o.name] for o in outputs})

    def skeleton_intact(self, out: Path) -> bool:
        """Whether the files ``build`` wrote into ``out`` are there (a resumed run keeps them)."""
        return True


class NameLayout(Layout):
    """``--to tf-checkpoint``: keys are the output names (TF1 name-based); no TensorFlow. A TF2
    source's object graph is carried over when it stays true (``carried_graph``)."""

    def build(self, out: Path, work: Path, outputs: list[OutputTensor], source: Any = None) -> Skeleton:
        graph = carried_graph(source, outputs)
        if graph is None:
            return Skeleton({o.name: [o.name] for o in outputs})
        data, crc = bundleformat.string_tensor(graph[1])
        return Skeleton({o.name: [o.name] for o in outputs}, [Carried.of(OBJECT_GRAPH_KEY, STRING, graph[0], data, crc)])


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


class _BuilderOptions(Layout):
    """A layout TensorFlow builds, optionally from a model builder (recorded by name and config digest)."""

    needs_tf = True

    def __init__(self, builder: str | None, config: Path | None) -> None:
        self.builder, self.config = builder, config

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.builder is not None:
            opts["model_builder"] = self.builder
        if self.config is not None:
            import hashlib

            opts["model_config_sha256"] = hashlib.sha256(self.config.read_bytes()).hexdigest()
        return opts


class CheckpointLayout(_BuilderOptions):
    """``--to tf-checkpoint --model-builder``: the keys of ``tf.train.Checkpoint(model=...)``."""

    def build(self, out: Path, work: Path, outputs: list[OutputTensor], source: Any = None) -> Skeleton:
        from . import ops

        assert self.builder is not None
        tf = ops.import_tf()
        obj, _ = ops.call_builder(self.builder, self.config)
        prefix = work / "skeleton"
        ckpt = ops.write_checkpoint(tf, obj, prefix, self.builder)
        skel = match_skeleton(prefix, outputs, self.builder, "model/", keras_rename(ckpt, obj, outputs, "checkpoint"))
        _remove_bundle(prefix)
        del obj, ckpt
        gc.collect()  # the builder's model held its initial values: release them before streaming
        return skel


class SavedModelLayout(_BuilderOptions):
    """``--to savedmodel``: ``DEST/`` (or ``DEST/N/`` with a serving version) holds
    ``saved_model.pb`` and ``variables/variables.*``; the manifest in ``assets.extra/``."""

    prefix = "variables/variables"
    state_file = False

    def __init__(self, builder: str | None, config: Path | None, serving_version: int | None) -> None:
        super().__init__(builder, config)
        self.serving_version = serving_version

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if self.serving_version is not None:
            opts["serving_version"] = self.serving_version
        return opts

    def model_dir(self, root: Path) -> Path:
        return root / str(self.serving_version) if self.serving_version is not None else root

    def final_paths(self, dest: Path) -> list[Path]:
        return [self.model_dir(dest)]

    def manifest_path(self, root: Path) -> Path:
        # assets.extra/: files a SavedModel carries that its loader ignores (TF Serving convention).
        return self.model_dir(root) / "assets.extra" / MANIFEST_NAME

    def moves(self, out: Path, dest: Path) -> list[tuple[Path, Path]]:
        if self.serving_version is not None and dest.is_dir():
            return [(self.model_dir(out), self.model_dir(dest))]  # a new version beside the others
        return [(out, dest)]

    def check_outputs(self, outputs: list[OutputTensor]) -> list[str]:
        """Without a builder every output becomes a variable of that name in nested modules."""
        return [] if self.builder is not None else savedmodel_problems(outputs)

    def skeleton_intact(self, out: Path) -> bool:
        return (self.model_dir(out) / "saved_model.pb").is_file()

    def build(self, out: Path, work: Path, outputs: list[OutputTensor], source: Any = None) -> Skeleton:
        from . import ops

        tf = ops.import_tf()
        model_dir = self.model_dir(out)
        if self.builder is None:
            obj, signatures = ops.skeleton_module(tf, outputs), None
        else:
            obj, signatures = ops.call_builder(self.builder, self.config)
        ops.save_savedmodel(tf, obj, signatures, model_dir, self.builder)
        prefix = model_dir / self.prefix
        rename = keras_rename(obj, obj, outputs, "savedmodel") if self.builder is not None else _same_name
        skel = match_skeleton(prefix, outputs, self.builder, "", rename)
        _remove_bundle(prefix)  # the skeleton's index and data: the values are written in their place
        del obj, signatures
        gc.collect()  # a builder's model held its initial values: release them before streaming
        return skel


def _same_name(path: str, name: str) -> str:
    return name


def _remove_bundle(prefix: Path) -> None:
    """Every file of a bundle prefix (index, data shards, TensorFlow's temporary files)."""
    if prefix.parent.is_dir():
        for p in prefix.parent.iterdir():
            if p.name.startswith(prefix.name + "."):
                safefs.remove(p)


def layout_for(to: str, builder: str | None, config: str | os.PathLike | None,
               serving_version: int | None) -> Layout:
    """The layout of ``--to`` with its options, checked before any work (UsageError)."""
    if serving_version is not None and to != "savedmodel":
        raise UsageError("--serving-version applies to --to savedmodel only")
    if serving_version is not None and (not isinstance(serving_version, int) or serving_version < 0):
        raise UsageError(f"--serving-version must be a non-negative integer, got {serving_version!r}")
    if config is not None and builder is None:
        raise UsageError("--model-config is the argument of --model-builder; pass --model-builder module:function")
    path = Path(config).absolute() if config is not None else None
    if path is not None and not path.is_file():
        raise UsageError(f"{path}: --model-config file does not exist")
    if to == "savedmodel":
        return SavedModelLayout(builder, path, serving_version)
    return CheckpointLayout(builder, path) if builder is not None else NameLayout()


__all__ = ["Layout", "NameLayout", "CheckpointLayout", "SavedModelLayout", "Skeleton", "Carried", "layout_for",
           "MANIFEST_NAME", "STRING"]
