"""Reference checkpoints written by real TensorFlow, read back without TF.

``write_fixture`` runs ``tests/tf_fixtures.py`` (which imports TensorFlow) in a
subprocess; ``load_reference`` reads the values TF itself read back from the
checkpoint (``OUTDIR/reference/``). This module never imports TensorFlow.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

FIXTURE_SCRIPT = Path(__file__).resolve().with_name("tf_fixtures.py")


def write_fixture(kind: str, outdir: Path, *args: str) -> Path:
    """Run ``python tests/tf_fixtures.py KIND OUTDIR *ARGS``; return ``outdir``."""
    outdir = Path(outdir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    cmd = [sys.executable, str(FIXTURE_SCRIPT), kind, str(outdir), *map(str, args)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                       timeout=900)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with exit status {e.returncode}:\n"
            f"{e.stderr}\n{e.stdout}") from None
    return outdir


def load_reference_index(outdir: Path) -> dict:
    """The parsed ``OUTDIR/reference/index.json``."""
    return json.loads((Path(outdir) / "reference" / "index.json").read_text())


def reference_prefix(outdir: Path) -> Path:
    """The checkpoint prefix (``.../model.ckpt-7``, ``.../ckpt-2``, ...)."""
    return Path(outdir) / load_reference_index(outdir)["prefix"]


def numpy_dtype(name: str) -> np.dtype:
    """Numpy dtype for a reference dtype name ("bfloat16" -> ml_dtypes.bfloat16)."""
    if name == "string":
        return np.dtype(object)
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def load_reference(outdir: Path) -> dict[str, np.ndarray | list[bytes]]:
    """name -> value as TF read it: arrays with their true dtype and shape;
    string tensors as a flat (C-order) list of bytes. Tensors written without
    values (``big --no-reference``) are left out; see ``load_reference_index``
    for their dtype and shape."""
    refdir = Path(outdir) / "reference"
    index = load_reference_index(outdir)
    out: dict[str, np.ndarray | list[bytes]] = {}
    for name, entry in index["tensors"].items():
        fname = entry.get("file")
        if fname is None:
            continue
        shape = tuple(entry["shape"])
        if entry["dtype"] == "string":
            items = json.loads((refdir / fname).read_text())
            out[name] = [base64.b64decode(s) for s in items]
            if len(out[name]) != int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"{name}: {len(out[name])} strings for shape {shape}")
            continue
        dtype = numpy_dtype(entry["dtype"])
        arr = np.frombuffer((refdir / fname).read_bytes(), dtype=dtype).reshape(shape)
        if sys.byteorder == "big" and dtype.itemsize > 1:  # files are little-endian
            arr = arr.byteswap()
        out[name] = arr.copy()
    return out


def load_model_values(outdir: Path) -> dict[str, dict[str, np.ndarray]]:
    """reference/model.json: model variable path -> {"raw": array, "ema": array (if any)},
    the values TensorFlow/Keras held when the checkpoint was written."""
    refdir = Path(outdir) / "reference"
    out = {}
    for path, kinds in json.loads((refdir / "model.json").read_text()).items():
        out[path] = {k: np.frombuffer((refdir / v["file"]).read_bytes(), dtype=numpy_dtype(v["dtype"])).reshape(v["shape"])
                     for k, v in kinds.items()}
    return out


def assert_exact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same names, and for each the same dtype, shape and bytes (C order)."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (name, g.dtype, g.shape, w.dtype, w.shape)
        assert np.ascontiguousarray(g).tobytes() == np.ascontiguousarray(w).tobytes(), name
