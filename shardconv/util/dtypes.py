"""Dtype names, their NumPy types (ml_dtypes for bfloat16 and float8) and TF enums."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np

#: NumPy's own dtypes with their item sizes, known without importing NumPy (listing a
#: checkpoint needs sizes, not arrays; tests/test_dtypes.py checks them against NumPy).
_NUMPY_ITEMSIZES: dict[str, int] = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
}
#: ml_dtypes types (bfloat16, float8, sub-byte ints; one element per byte, value in the low
#: bits: TF's and ml_dtypes' layout alike) with their item sizes, known without importing it.
_ML_ITEMSIZES: dict[str, int] = {
    "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e4m3b11fnuz": 1, "int4": 1, "uint4": 1, "int2": 1, "uint2": 1,
}
_ITEMSIZES: dict[str, int] = {**_NUMPY_ITEMSIZES, **_ML_ITEMSIZES}


class _DtypeTable(Mapping[str, "np.dtype"]):
    """Canonical name -> NumPy dtype, built on first lookup: NumPy is imported then, and
    ``ml_dtypes`` (over a second to import, for its ufunc registration) only when one of
    its types is first looked up."""

    def __init__(self) -> None:
        self._dtypes: dict[str, np.dtype] = {}

    def __getitem__(self, name: str) -> np.dtype:
        dt = self._dtypes.get(name)
        if dt is None:
            import numpy as np

            if name in _NUMPY_ITEMSIZES:
                dt = np.dtype(name)
            elif name in _ML_ITEMSIZES:
                import ml_dtypes

                dt = np.dtype(getattr(ml_dtypes, name))
            else:
                raise KeyError(name)
            self._dtypes[name] = dt
        return dt

    def __contains__(self, name: object) -> bool:
        return name in _ITEMSIZES

    def __iter__(self) -> Iterator[str]:
        return iter(_ITEMSIZES)

    def __len__(self) -> int:
        return len(_ITEMSIZES)


#: Canonical dtype name -> NumPy dtype. Names are NumPy's (and ml_dtypes').
NUMPY_DTYPES: Mapping[str, np.dtype] = _DtypeTable()

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
    import numpy as np

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
    """Bytes per element of a canonical dtype name (no ml_dtypes import needed)."""
    try:
        return _ITEMSIZES[name]
    except KeyError:
        raise UnsupportedError(f"dtype {name!r} has no array representation") from None


INT64_MAX = (1 << 63) - 1


def checked_nbytes(shape: tuple[int, ...] | list[int], dtype: str, where: str) -> int:
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
