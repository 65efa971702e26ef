"""Legacy Orbax aggregate layout: a msgpack ``checkpoint`` file in the item holding leaves
inline (``skip_deserialize``) and ``PLACEHOLDER://`` references to Zarr arrays beside it.

References are what ``orbax.checkpoint.PyTreeCheckpointer().restore()`` returns, run here.
Orbax restores an inline leaf as flax's msgpack reader gives it: a NumPy array or NumPy
scalar for flax's ext types, a Python ``int``/``float``/``bool`` for a plain msgpack number.
shardconv lists a plain msgpack integer as int64 and a float as float64 (the widest msgpack
stores, and what ``np.asarray`` makes of the Python value); ``host`` compares them so.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TESTDATA
from test_npz import load_npz

import shardconv
from shardconv.errors import FormatError
from shardconv.sources import open_source
from shardconv.sources.orbax import OrbaxSource
from shardconv.sources.t5x import T5xSource
from shardconv.testing.source_suite import SourceTests

ocp = pytest.importorskip("orbax.checkpoint")
jnp = pytest.importorskip("jax.numpy")
from orbax.checkpoint import msgpack_utils  # noqa: E402
from reference import assert_exact  # noqa: E402
from test_jax_sources import host  # noqa: E402

LEGACY = {"some": TESTDATA / "ecosystem" / "orbax-aggregate-some",   # a, b as arrays; c/a, c/e inline
          "all": TESTDATA / "ecosystem" / "orbax-aggregate-all"}     # every leaf inline


def orbax_restore(path: Path) -> dict[str, np.ndarray]:
    """What Orbax restores, as '/'-named NumPy values."""
    return host(ocp.PyTreeCheckpointer().restore(path))


@functools.cache
def _vendored_reference(kind: str) -> dict[str, np.ndarray]:
    return orbax_restore(LEGACY[kind])


def copy_of(kind: str, tmp_path: Path) -> Path:
    """A writable copy of a vendored checkpoint (the vendored files may be read-only)."""
    dst = tmp_path / f"aggregate-{kind}"
    shutil.copytree(LEGACY[kind], dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("kind", sorted(LEGACY))
def test_vendored_legacy_checkpoint_lists_and_converts_as_orbax_restores(kind, tmp_path):
    want = _vendored_reference(kind)
    before = digests(LEGACY[kind])
    with open_source(LEGACY[kind]) as src:
        assert isinstance(src, OrbaxSource)
        listed = {t.name: (t.dtype, tuple(t.shape)) for t in src.tensors()}
    assert listed == {n: (v.dtype.name, v.shape) for n, v in want.items()}
    shardconv.convert(LEGACY[kind], tmp_path / "o.npz")
    assert_exact(load_npz(tmp_path / "o.npz"), want)
    assert digests(LEGACY[kind]) == before  # reading never modifies the input


def test_inline_values_win_over_arrays_and_keep_scalar_types(tmp_path):
    """A checkpoint saved by current Orbax, then given an aggregate file by Orbax's own
    msgpack writer in which some leaves hold values (different from their arrays) and the
    others placeholders: Orbax restores the inline values; so must shardconv."""
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "emb": jnp.ones((2, 3), jnp.bfloat16),
            "opt": {"count": np.int32(3), "lr": np.float32(0.5)}, "step": 7, "scale": 1.5}
    ckpt = tmp_path / "ckpt"
    ocp.PyTreeCheckpointer().save(ckpt, tree)
    # Placeholders only for arrays: Orbax restores a scalar leaf stored as an array as a Python
    # number, where shardconv keeps the stored dtype (np.float32 stays float32; test_jax_sources).
    aggregate = {"w": "PLACEHOLDER://w", "emb": np.full((2, 3), 2, np.float32).astype(jnp.bfloat16),
                 "opt": {"count": np.int32(-4), "lr": np.float32(0.125)}, "step": 9, "scale": 2.25}
    (ckpt / "checkpoint").write_bytes(msgpack_utils.msgpack_serialize(aggregate))
    want = orbax_restore(ckpt)
    assert want["step"] == 9 and want["opt/count"] == -4 and want["w"][2, 3] == 11  # inline and array
    assert (want["opt/lr"].dtype, want["step"].dtype, want["scale"].dtype) == (np.float32, np.int64, np.float64)
    with open_source(ckpt) as src:
        assert isinstance(src, OrbaxSource)
        assert_exact({t.name: src.read(t.name) for t in src.tensors()}, want)


def test_legacy_checkpoint_without_metadata_reads_placeholders_beside_the_file(tmp_path):
    """Orbax before ``_METADATA``: the msgpack file is the whole tree."""
    d = copy_of("some", tmp_path)
    (d / "_METADATA").unlink()
    want = orbax_restore(d)
    with open_source(d) as src:
        assert isinstance(src, T5xSource)
        assert_exact({t.name: src.read(t.name) for t in src.tensors()}, want)


class TestLegacyAggregateSome(SourceTests):
    kind = "some"

    def make(self, tmp_path):
        return OrbaxSource(copy_of(self.kind, tmp_path)), _vendored_reference(self.kind)


class TestLegacyAggregateAll(TestLegacyAggregateSome):
    kind = "all"


class TestLegacyAggregateWithoutMetadata(TestLegacyAggregateSome):
    def make(self, tmp_path):
        d = copy_of(self.kind, tmp_path)
        (d / "_METADATA").unlink()
        return open_source(d), _vendored_reference(self.kind)


# -- damaged copies: one line naming the file and the leaf ----------------------------------

def _rewrite_aggregate(d: Path, edit: Any) -> None:
    tree = msgpack_utils.msgpack_restore((d / "checkpoint").read_bytes())
    edit(tree)
    (d / "checkpoint").write_bytes(msgpack_utils.msgpack_serialize(tree))


HOSTILE = {
    "checkpoint file truncated inside an inline leaf": (
        "some", lambda d: (d / "checkpoint").write_bytes((d / "checkpoint").read_bytes()[:100]),
        ["checkpoint", "'c/a'", "truncated"]),
    "placeholder's array missing": ("some", lambda d: shutil.rmtree(d / "b"), ["'b'", "b/.zarray", "missing"]),
    "placeholder's array missing, no _METADATA": (
        "some", lambda d: (shutil.rmtree(d / "b"), (d / "_METADATA").unlink()), ["checkpoint", "'b'", "missing"]),
    "inline leaf missing from the checkpoint file": (
        "all", lambda d: _rewrite_aggregate(d, lambda t: t["c"].pop("e")), ["checkpoint", "'c/e'", "no value"]),
    "placeholder names another array": (
        "some", lambda d: _rewrite_aggregate(d, lambda t: t.update(a="PLACEHOLDER://b")), ["checkpoint", "'a'", "'b'"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_damaged_legacy_checkpoint_gives_one_line(case, tmp_path):
    kind, damage, words = HOSTILE[case]
    d = copy_of(kind, tmp_path)
    damage(d)
    with pytest.raises(FormatError) as e:
        with open_source(d) as src:
            for t in src.tensors():
                src.read(t.name)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
