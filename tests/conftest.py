"""Shared pytest fixtures: TensorFlow-written checkpoints (made in a
subprocess, so this process never imports TF) and the shared test data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import write_fixture  # noqa: E402

_HERE = Path(__file__).resolve()
SHARED_TESTDATA = (_HERE.parents[2] / "shared" / "testdata"
                   if (_HERE.parents[2] / "shared" / "testdata").exists()
                   else _HERE.parents[1] / "shared" / "testdata")


@pytest.fixture(scope="session")
def tf1_dtypes_ckpt(tmp_path_factory) -> Path:
    """TF1 sharded Saver checkpoint (3 shards): every dtype, partitioned vars."""
    return write_fixture("tf1_dtypes", tmp_path_factory.mktemp("tf1_dtypes"))


@pytest.fixture(scope="session")
def tf2_keras_ckpt(tmp_path_factory) -> Path:
    """tf.train.Checkpoint of a Keras 3 model + Adam; ckpt-1 and ckpt-2."""
    return write_fixture("tf2_keras", tmp_path_factory.mktemp("tf2_keras"))


@pytest.fixture(scope="session")
def savedmodel_ckpt(tmp_path_factory) -> Path:
    """SavedModel in OUTDIR/sm; prefix sm/variables/variables."""
    return write_fixture("savedmodel", tmp_path_factory.mktemp("savedmodel"))


@pytest.fixture(scope="session")
def exotic_dtypes_ckpt(tmp_path_factory) -> Path:
    """SaveV2 bundle of float8 / int4 / int2 / quantized dtypes."""
    return write_fixture("exotic_dtypes", tmp_path_factory.mktemp("exotic_dtypes"))


@pytest.fixture(scope="session")
def big_ckpt(tmp_path_factory) -> Path:
    """TF1 sharded checkpoint of ~192 MiB float32 over 3 shards (largest tensor ~58 MiB),
    with TF's sha256 of every tensor in reference/index.json."""
    return write_fixture("big", tmp_path_factory.mktemp("big"), "--mib", "192", "--shards", "3",
                         "--no-reference", "--digests")


@pytest.fixture(scope="session")
def keras_ema_ckpt(tmp_path_factory) -> Path:
    """Keras 3 model, Adam(use_ema=True), train_on_batch x3; model.json has raw and EMA values."""
    return write_fixture("keras_ema", tmp_path_factory.mktemp("keras_ema"))


@pytest.fixture(scope="session")
def tf1_ema_ckpt(tmp_path_factory) -> Path:
    """TF1 MomentumOptimizer + tf.train.ExponentialMovingAverage."""
    return write_fixture("tf1_ema", tmp_path_factory.mktemp("tf1_ema"))


@pytest.fixture(scope="session")
def tf2_v1_slots_ckpt(tmp_path_factory) -> Path:
    """tf.train.Checkpoint of a tf.Module + v1 AdamOptimizer: .OPTIMIZER_SLOT keys."""
    return write_fixture("tf2_v1_slots", tmp_path_factory.mktemp("tf2_v1_slots"))
