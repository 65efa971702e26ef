"""``--to tf-checkpoint``: a TensorFlow checkpoint written by shardconv's own bundle writer.

``DEST/`` holds ``ckpt.data-00000-of-00001`` (every tensor's raw bytes at an offset fixed
by the plan, written with ``pwrite`` in any chunk order, in key order without padding, as
TensorFlow's ``SaveV2`` lays them out), ``ckpt.index`` (the SSTable of entries, written at
``finish`` by ``formats/bundleformat``; each entry's CRC32C combined from the chunks' CRCs),
a ``checkpoint`` state file (so ``tf.train.load_checkpoint(DEST)`` and shardconv's reader
accept the directory) and the manifest ``shardconv.json``. For the same tensors the files
are byte-identical to what ``tf.raw_ops.SaveV2`` writes.

Keys are the output names (TF1 name-based: ``tf.compat.v1.train.Saver`` restores them).
When every output is a source tensor under its own raw key (``--names keys``) and the
source is a TF2 checkpoint whose other tensors are only its object graph, that graph is
carried over as the string tensor ``_CHECKPOINTABLE_OBJECT_GRAPH``, so
``tf.train.Checkpoint.restore`` restores it as it restored the source. With
``--model-builder`` the keys are those of ``tf.train.Checkpoint(model=<built model>)``:
TensorFlow builds that skeleton, the values are written the same way.

The sink is ``sinks/tf/savedmodel.py``'s ``TFCheckpointSink`` (layouts in ``sinks/tf/layout.py``,
the writer in ``sinks/tf/bundle.py``); no TensorFlow is imported without a builder.
"""
from __future__ import annotations

from .tf.bundle import DATA_SUFFIX
from .tf.layout import MANIFEST_NAME, carried_graph
from .tf.savedmodel import TFCheckpointSink, TFOptions

PREFIX = "ckpt"
DATA_NAME = f"{PREFIX}{DATA_SUFFIX}"
INDEX_NAME = f"{PREFIX}.index"

#: The registry's name for the ``--to tf-checkpoint`` sink (with or without a model builder).
tf_checkpoint_sink = TFCheckpointSink
TFBundleSink = TFCheckpointSink

__all__ = ["TFCheckpointSink", "TFBundleSink", "TFOptions", "tf_checkpoint_sink", "carried_graph", "PREFIX",
           "DATA_NAME", "INDEX_NAME", "MANIFEST_NAME"]
