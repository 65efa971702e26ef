"""Every call into TensorFlow the TF sinks make: the import, the model builder, the skeleton.

TensorFlow is imported only here, and only when a skeleton is built (never by ``import
shardconv``, ``ls`` or ``plan``). The values themselves never pass through TensorFlow: the
variables bundle is written by ``sinks/tf/bundle.py``.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...core.plan import OutputTensor
from ...errors import MissingDependencyError, UsageError
from ...util.dtypes import numpy_dtype

#: RSS that ``import tensorflow`` adds (measured: 638 MiB with numpy, TF 2.21, Linux x86-64).
TF_IMPORT_BYTES = 610 << 20


def import_tf() -> Any:
    """Import TensorFlow (quietly), or raise MissingDependencyError naming the extra that installs it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF errors reach us as exceptions
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # quiet; shardconv computes nothing with TF
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingDependencyError("tensorflow", "tf",
                                     "TensorFlow output (--to savedmodel / tf-checkpoint --model-builder)") from None
    return tf


def skeleton_module(tf: Any, outputs: list[OutputTensor]) -> Any:
    """Nested trackable nodes (one per ``/`` in the names) whose leaves are
    ``UninitializedVariable``s: the SavedModel's structure without allocating any value."""
    from tensorflow.python.ops.resource_variable_ops import UninitializedVariable

    class Node(tf.__internal__.tracking.AutoTrackable):
        def __init__(self) -> None:
            object.__setattr__(self, "_shardconv_children", {})

        def _trackable_children(self, save_type: str = "checkpoint", **kwargs: Any) -> dict[str, Any]:
            return dict(self._shardconv_children)

    root = Node()
    for o in outputs:
        *path, leaf = o.name.split("/")
        node = root
        for part in path:
            node = node._shardconv_children.setdefault(part, Node())
        node._shardconv_children[leaf] = UninitializedVariable(
            shape=o.shape, dtype=tf.dtypes.as_dtype(numpy_dtype(o.dtype)), name=o.name)
    return root


def load_builder(spec: str) -> Callable[..., Any]:
    """The ``module:function`` of ``--model-builder``, from the current directory or PYTHONPATH."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"--model-builder must be module:function, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise UsageError(f"--model-builder {spec}: no module {module!r} in the current directory or on "
                             "PYTHONPATH") from None
        raise UsageError(f"--model-builder {spec}: importing {module!r} failed: {e}") from None
    except Exception as e:
        raise UsageError(f"--model-builder {spec}: importing {module!r} failed: {type(e).__name__}: {e}") from None
    try:
        fn = functools.reduce(getattr, attr.split("."), mod)
    except AttributeError:
        raise UsageError(f"--model-builder {spec}: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise UsageError(f"--model-builder {spec}: {attr!r} is not callable")
    return fn


def call_builder(spec: str, config: Path | None) -> tuple[Any, Any]:
    """Build the model: (trackable object, signatures or None for TensorFlow's default)."""
    fn = load_builder(spec)
    try:
        result = fn(str(config) if config is not None else None)
    except Exception as e:
        raise UsageError(f"--model-builder {spec} raised {type(e).__name__}: {e}") from None
    obj, signatures = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    tf = import_tf()
    if not isinstance(obj, tf.__internal__.tracking.Trackable):
        raise UsageError(f"--model-builder {spec} returned {type(obj).__name__}; expected a Keras model or tf.Module")
    return obj, signatures


def save_savedmodel(tf: Any, obj: Any, signatures: Any, model_dir: Path, builder: str | None) -> None:
    """``tf.saved_model.save``: ``saved_model.pb`` and a variables checkpoint of the object graph."""
    try:
        tf.saved_model.save(obj, str(model_dir), signatures=signatures)
    except Exception as e:
        if builder is None:
            raise
        raise UsageError(f"--model-builder {builder}: tf.saved_model.save failed on the model it "
                         f"returned: {type(e).__name__}: {e}") from None


def write_checkpoint(tf: Any, obj: Any, prefix: Path, builder: str) -> Any:
    """``tf.train.Checkpoint(model=obj).write(prefix)``; returns the checkpoint object (the root)."""
    ckpt = tf.train.Checkpoint(model=obj)
    ckpt.save_counter  # noqa: B018 (created here so the output restores like a ckpt.save() one)
    try:
        ckpt.write(str(prefix))
    except Exception as e:
        raise UsageError(f"--model-builder {builder}: cannot checkpoint the model it returned: {e}") from None
    return ckpt


def keras_variable_paths(model: Any) -> dict[int, str]:
    """id() of each Keras 3 variable of ``model`` (and of the TF variable inside it) -> its
    Keras ``path``; empty without Keras 3 (``keras.Variable``)."""
    keras = sys.modules.get("keras")
    if keras is None or not hasattr(keras, "Variable"):
        return {}
    names: dict[int, str] = {}
    for v in getattr(model, "variables", []) or []:
        if isinstance(v, keras.Variable):
            names[id(v)] = v.path
            inner = getattr(v, "_value", None)
            if inner is not None:
                names[id(inner)] = v.path
    return names


def python_object(root: Any, path: list[str], save_type: str, cache: dict[int, dict[str, Any]]) -> Any:
    """The live object at an object-graph ``path`` (local names) from ``root``, through the
    same ``_trackable_children`` the saver walked."""
    obj = root
    for part in path:
        if isinstance(obj, (list, tuple)):  # Keras 3 keeps layers in plain lists (Sequential._layers)
            obj = obj[int(part)]
            continue
        kids = cache.get(id(obj))
        if kids is None:
            kids = cache[id(obj)] = dict(obj._trackable_children(save_type=save_type))
        obj = kids[part]
    return obj
