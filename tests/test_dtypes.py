"""util/dtypes.py: the item sizes it knows without NumPy are NumPy's (and ml_dtypes'), and
importing it loads neither."""
from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from shardconv.util import dtypes


@pytest.mark.parametrize("name", list(dtypes.NUMPY_DTYPES))
def test_item_sizes_known_without_numpy_are_numpys(name):
    want = np.dtype(getattr(ml_dtypes, name) if name in dtypes._ML_ITEMSIZES else name)
    assert dtypes.itemsize(name) == want.itemsize
    assert dtypes.NUMPY_DTYPES[name] == want and dtypes.dtype_name(want) == name


def test_importing_the_dtype_table_imports_no_numpy():
    code = ("import sys; from shardconv.util import dtypes; dtypes.itemsize('bfloat16'); "
            "dtypes.checked_nbytes((3, 4), 'float32', 'x'); assert 'numpy' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name", list(dtypes.NUMPY_DTYPES))
def test_npy_descrs_known_without_numpy_are_what_np_save_writes(name):
    from shardconv.formats import npyformat

    want = (f"<V{dtypes.itemsize(name)}" if name in dtypes._ML_ITEMSIZES
            else np.lib.format.dtype_to_descr(np.dtype(name)))
    assert npyformat.descr_of(name) == want


def test_writing_an_npy_header_imports_no_numpy():
    code = ("import sys; from shardconv.formats import npyformat; npyformat.header('float32', (3, 4)); "
            "npyformat.header('bfloat16', ()); assert 'numpy' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
