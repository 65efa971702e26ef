"""``--to savedmodel``: the sink lives in ``sinks/tf/`` (layouts, TensorFlow calls, the bundle
writer, the sink); this module keeps the registry's name for it."""
from __future__ import annotations

from .tf.savedmodel import SavedModelSink, TFCheckpointSink, TFOptions, TFSink

__all__ = ["SavedModelSink", "TFCheckpointSink", "TFOptions", "TFSink"]
