"""Shared pytest fixtures: TensorFlow-written checkpoints (made in a subprocess,
so this process never imports TF) and the path of the vendored test data (``tests/data``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# JAX tests shard arrays over 8 CPU devices. XLA reads this flag when its CPU backend
# starts, so it is set here, before any test module can start one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import write_fixture  # noqa: E402

_HERE = Path(__file__).resolve()
# Real checkpoints written by other software, vendored with their sources and licence (see its README.md).
TESTDATA = _HERE.parent / "data"


def skip_unless_installed(*modules: str) -> None:
    """Skip the test where a module is not installed, without importing it (``pytest.importorskip``
    would import TensorFlow into this process, which tests assert it never does)."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed")


def _tf_checkpoint(kind: str, *args: str, doc: str):
    """A session fixture that writes ``tests/tf_fixtures.py KIND`` once and returns its directory."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory) -> Path:
        return write_fixture(kind, tmp_path_factory.mktemp(kind), *args)
    fixture.__doc__ = doc
    return fixture


tf1_dtypes_ckpt = _tf_checkpoint("tf1_dtypes", doc="TF1 sharded Saver checkpoint (3 shards): every dtype, partitioned vars.")
tf2_keras_ckpt = _tf_checkpoint("tf2_keras", doc="tf.train.Checkpoint of a Keras 3 model + Adam; ckpt-1 and ckpt-2.")
savedmodel_ckpt = _tf_checkpoint("savedmodel", doc="SavedModel in OUTDIR/sm; prefix sm/variables/variables.")
exotic_dtypes_ckpt = _tf_checkpoint("exotic_dtypes", doc="SaveV2 bundle of float8 / int4 / int2 / quantized dtypes.")
keras_ema_ckpt = _tf_checkpoint("keras_ema", doc="Keras 3 model, Adam(use_ema=True), train_on_batch x3; "
                                                 "reference/model.json has raw and EMA values.")
tf1_ema_ckpt = _tf_checkpoint("tf1_ema", doc="TF1 MomentumOptimizer + tf.train.ExponentialMovingAverage.")
tf2_v1_slots_ckpt = _tf_checkpoint("tf2_v1_slots", doc="tf.train.Checkpoint of a tf.Module + v1 AdamOptimizer: "
                                                       ".OPTIMIZER_SLOT keys.")
big_ckpt = _tf_checkpoint("big", "--mib", "192", "--shards", "3", "--no-reference", "--digests",
                          doc="TF1 sharded checkpoint of ~192 MiB float32 over 3 shards (largest tensor ~58 MiB), "
                              "with TF's sha256 of every tensor in reference/index.json.")


S3_BUCKET = "shardconv-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 for one test module, with bucket ``S3_BUCKET``; the
    environment points boto3 and TensorStore (and processes started meanwhile) at it.
    Yields the endpoint URL."""
    pytest.importorskip("flask", reason="moto's server needs moto[server]")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield env["AWS_ENDPOINT_URL"]
    server.stop()


def s3_objects(prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` in ``S3_BUCKET``: key (after the prefix) -> bytes."""
    import boto3

    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=S3_BUCKET, Key=k)["Body"].read() for k in keys}
