"""Teach zarr-python the ml_dtypes data types TensorStore writes (bfloat16, float8, int4, int2).

TensorStore (and so Orbax and shardconv's Zarr output) stores these as the data type
names ``"bfloat16"``, ``"float8_e4m3fn"``, ... (Zarr v3 ``data_type``; Zarr v2 ``dtype``).
zarr-python 3.1 has no such data types: opening such an array, or listing a group that
holds one, fails with ``ValueError: No Zarr data type found that matches 'bfloat16'``.
After ``register()`` zarr-python reads them as the ml_dtypes NumPy types, bit-exact::

    import shardconv.formats.zarr_dtypes, zarr
    shardconv.formats.zarr_dtypes.register()
    zarr.open_group("model.zarr", mode="r")["params/emb"][:]   # dtype bfloat16

Only zarr-python is imported (when ``register`` is called), never TensorStore.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

#: Data type names (TensorStore's, ml_dtypes') registered by ``register``.
NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
         "float8_e4m3b11fnuz", "int4", "int2")

_registered: dict[str, type] = {}


class _Scalars:
    """JSON and Python scalars of one ml_dtypes type: floats may be "NaN"/"Infinity" in JSON."""

    def __init__(self, name: str, native: np.dtype) -> None:
        self.name, self.native = name, native
        self.is_float = name.startswith(("float", "bfloat"))

    def check(self, data: object) -> bool:
        return isinstance(data, (int, float, np.generic)) or (self.is_float and isinstance(data, str))

    def cast(self, data: object) -> Any:
        if not self.check(data):
            raise TypeError(f"cannot cast {data!r} to {self.name}")
        value: Any = data
        return self.native.type(float(value) if self.is_float else int(value))

    def from_json(self, data: Any) -> Any:
        if data is None:
            return self.native.type(0)
        if self.is_float and isinstance(data, str):  # "NaN", "Infinity", "-Infinity"
            return self.native.type(float(data.replace("Infinity", "inf")))
        return self.cast(data)

    def to_json(self, data: object) -> Any:
        v = float(self.cast(data)) if self.is_float else int(self.cast(data))
        if self.is_float and (v != v or v in (float("inf"), float("-inf"))):
            return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
        return v


def _make(name: str) -> type:
    """A zarr-python ZDType class for ml_dtypes type ``name`` (Zarr name = the type's name)."""
    from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize
    from zarr.core.dtype.wrapper import ZDType

    native = np.dtype(getattr(ml_dtypes, name))
    scalars = _Scalars(name, native)

    @dataclass(frozen=True, kw_only=True)
    class MLDType(ZDType, HasEndianness, HasItemSize):
        dtype_cls = type(native)
        _zarr_v3_name = name

        @classmethod
        def from_native_dtype(cls, dtype: Any) -> MLDType:
            if isinstance(dtype, np.dtype) and dtype == native:
                return cls()
            raise DataTypeValidationError(f"{dtype!r} is not {name}")

        def to_native_dtype(self) -> np.dtype:
            if self.endianness == "big" and native.itemsize > 1:
                raise ValueError(f"big-endian {name} is not supported")
            return native

        @classmethod
        def _from_json_v2(cls, data: Any) -> MLDType:
            if isinstance(data, dict) and data.get("name") == name and data.get("object_codec_id") is None:
                return cls()
            raise DataTypeValidationError(f"{data!r} is not {name}")

        @classmethod
        def _from_json_v3(cls, data: Any) -> MLDType:
            if data == name:
                return cls()
            raise DataTypeValidationError(f"{data!r} is not {name}")

        def to_json(self, zarr_format: int) -> Any:
            return {"name": name, "object_codec_id": None} if zarr_format == 2 else name

        _check_scalar = staticmethod(scalars.check)
        cast_scalar = staticmethod(scalars.cast)
        default_scalar = staticmethod(lambda: native.type(0))

        def from_json_scalar(self, data: Any, *, zarr_format: int) -> Any:
            return scalars.from_json(data)

        def to_json_scalar(self, data: object, *, zarr_format: int) -> Any:
            return scalars.to_json(data)

        @property
        def item_size(self) -> int:
            return native.itemsize

    MLDType.__name__ = MLDType.__qualname__ = "ML_" + name
    return MLDType


def register() -> list[str]:
    """Register the ml_dtypes data types with zarr-python (idempotent); returns their names."""
    from zarr.core.dtype import data_type_registry

    for name in NAMES:
        if name not in _registered:
            _registered[name] = _make(name)
        data_type_registry.register(name, _registered[name])
    return list(NAMES)
