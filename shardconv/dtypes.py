"""Dtype names, their NumPy types (ml_dtypes for bfloat16 and float8) and TF enums."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import FormatError, UnsupportedError

#: Canonical dtype name -> NumPy dtype. Names are NumPy's (and ml_dtypes').
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in {
        "bool": np.bool_,
        "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
        "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
        "float16": np.float16, "float32": np.float32, "float64": np.float64,
        "complex64": np.complex64, "complex128": np.complex128,
        "bfloat16": ml_dtypes.bfloat16,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
        "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
        "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
        "float8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz,
        # One element per byte, value in the low bits: TF's and ml_dtypes' layout alike.
        "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4,
        "int2": ml_dtypes.int2, "uint2": ml_dtypes.uint2,
    }.items()
}

#: Name used for variable-length byte strings (TF DT_STRING); not an array dtype.
STRING = "string"

#: TensorFlow ``DataType`` enum values (types.proto) that checkpoints hold.
TF_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    7: STRING, 8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16",
    17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
    24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz",
    28: "float8_e5m2fnuz", 29: "int4", 30: "uint4", 31: "int2", 32: "uint2",
    # Quantized types are read as their storage integers, as tf.train.load_checkpoint returns them.
    11: "int8", 12: "uint8", 13: "int32", 15: "int16", 16: "uint16",
}
TF_DTYPE_NAMES_UNSUPPORTED: dict[int, str] = {
    20: "resource", 21: "variant", 33: "float4_e2m1fn",
}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a canonical name; UnsupportedError for strings or unknown names."""
    try:
        return NUMPY_DTYPES[name]
    except KeyError:
        raise UnsupportedError(f"dtype {name!r} has no array representation") from None


def dtype_name(dtype: np.dtype | str | type) -> str:
    """Canonical name of a NumPy (or ml_dtypes) dtype."""
    if isinstance(dtype, str) and dtype == STRING:
        return STRING
    dt = np.dtype(dtype)
    name = dt.name
    if name not in NUMPY_DTYPES or NUMPY_DTYPES[name] != dt:
        raise UnsupportedError(f"dtype {dt!r} is not supported")
    if dt.byteorder == ">":
        raise UnsupportedError(f"big-endian dtype {dt!r} is not supported")
    return name


def itemsize(name: str) -> int:
    return numpy_dtype(name).itemsize


INT64_MAX = (1 << 63) - 1


def checked_nbytes(shape: "tuple[int, ...] | list[int]", dtype: str, where: str) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (elements, for strings), refusing shapes
    whose element count or size overflows int64: a declared shape is never trusted."""
    numel = 1
    for d in shape:
        numel *= d
        if numel > INT64_MAX:
            raise FormatError(f"{where}: shape {list(shape)} has more elements than fit in int64")
    if dtype == "string":
        return numel
    nbytes = numel * itemsize(dtype)
    if nbytes > INT64_MAX:
        raise FormatError(f"{where}: shape {list(shape)} of {dtype} is too large ({nbytes} bytes)")
    return nbytes


def is_ml_dtype(name: str) -> bool:
    """True for dtypes NumPy cannot name in an .npy header (bfloat16, float8)."""
    return name == "bfloat16" or name.startswith("float8") or name in ("int4", "uint4", "int2", "uint2")
