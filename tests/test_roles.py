"""Roles (param / optimizer / ema / meta) on checkpoints written by the libraries people train with:
optax/flax TrainStates (in memory, Orbax, flax msgpack), t5x, tf.estimator, the TF guide's
``tf.train.Checkpoint(step=..., optimizer=..., net=...)``, Keras 3 and the TF1 optimizers.
``--drop-optimizer`` must leave exactly the model's weights, with their exact values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TESTDATA, skip_unless_installed
from procs import run_cli
from test_npz import load_npz

import shardconv
from shardconv.mapping.roles import assign_roles
from shardconv.sources import open_source

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
flax = pytest.importorskip("flax")
ocp = pytest.importorskip("orbax.checkpoint")
import flax.linen as nn  # noqa: E402
from flax import serialization, struct  # noqa: E402
from flax.training import train_state  # noqa: E402
from reference import assert_exact  # noqa: E402


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="hidden")(x))
        return nn.Dense(3, name="out")(nn.LayerNorm(name="norm")(x))


class EmaTrainState(train_state.TrainState):
    """A TrainState with an EMA of the params, as many flax training loops keep one."""
    ema_params: Any = struct.field(default=None)


TXS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3),
    "chain-ema": lambda: optax.chain(optax.adam(1e-2), optax.ema(0.9)),
    "inject-hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "sgd-momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "multisteps-lion": lambda: optax.MultiSteps(optax.lion(1e-3), every_k_schedule=2),
    "amsgrad-clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.amsgrad(1e-2)),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
    "adadelta": lambda: optax.adadelta(1.0),
}


def trained_state(tx_name: str, steps: int = 2, cls: type = train_state.TrainState, **extra: Any):
    """A TrainState after ``steps`` real optimizer updates (so the optimizer state is not all zeros)."""
    model = _Mlp()
    x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    state = cls.create(apply_fn=model.apply, params=params, tx=TXS[tx_name](), **extra)
    loss = lambda p: (model.apply({"params": p}, x) ** 2).mean()  # noqa: E731
    for _ in range(steps):
        state = state.apply_gradients(grads=jax.grad(loss)(state.params))
    return state


def param_values(state: Any) -> dict[str, np.ndarray]:
    """``params/...`` name -> value, as the TrainState holds them."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.params), sep="/")
    return {f"params/{k}": np.asarray(v) for k, v in flat.items()}


def save(state: Any, how: str, tmp_path: Path) -> Any:
    """The state saved by the real library (or itself, for the in-memory case)."""
    if how == "memory":
        return state
    if how == "orbax":
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp_path / "orbax", state)
        ckptr.wait_until_finished()
        return tmp_path / "orbax"
    if how == "orbax-pytree":
        ocp.PyTreeCheckpointer().save(tmp_path / "orbax-pytree", state)
        return tmp_path / "orbax-pytree"
    if how.startswith("flax-checkpoints"):  # flax.training.checkpoints: Orbax by default, or legacy msgpack
        from flax.training import checkpoints
        use_orbax = flax.config.flax_use_orbax_checkpointing
        flax.config.update("flax_use_orbax_checkpointing", how.endswith("orbax"))
        try:
            path = checkpoints.save_checkpoint(tmp_path / how, state, step=3)
        finally:
            flax.config.update("flax_use_orbax_checkpointing", use_orbax)
        return Path(path)
    path = tmp_path / "state.msgpack"
    path.write_bytes(serialization.to_bytes(state))
    return path


def assert_exactly(dest: Path, want: dict[str, np.ndarray]) -> None:
    assert_exact(load_npz(dest), want)


@pytest.mark.parametrize("how", ["memory", "orbax", "msgpack"])
@pytest.mark.parametrize("tx_name", ["adamw", "chain-ema", "inject-hyperparams"])
def test_drop_optimizer_on_an_optax_train_state_leaves_exactly_the_params(tx_name, how, tmp_path):
    state = trained_state(tx_name)
    r = shardconv.convert(save(state, how, tmp_path), tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", param_values(state))
    reasons = {name: why for name, why in r.dropped}
    assert "counter" in reasons["step"]
    assert all("optimizer state" in why for name, why in r.dropped if name.startswith("opt_state/"))
    assert sum(n.startswith("opt_state/") for n in reasons) >= 2 * len(param_values(state))


@pytest.mark.parametrize("how", ["flax-checkpoints-msgpack", "flax-checkpoints-orbax"])
def test_flax_training_checkpoints_of_a_train_state_drop_optimizer(how, tmp_path):
    state = trained_state("adamw")
    shardconv.convert(save(state, how, tmp_path), tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", param_values(state))


@pytest.mark.parametrize("tx_name", ["sgd-momentum", "multisteps-lion", "amsgrad-clip", "adafactor", "adadelta"])
def test_other_optax_optimizers_are_optimizer_state_too(tx_name, tmp_path):
    state = trained_state(tx_name, steps=3)
    shardconv.convert(save(state, "orbax-pytree", tmp_path), tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", param_values(state))


def test_optax_state_saved_beside_params_without_a_train_state_is_recognised_by_its_fields(tmp_path):
    """{'params': ..., 'opt': adam state}: no ``opt_state`` key, the ScaleByAdamState fields decide."""
    state = trained_state("adamw")
    tree = {"params": state.params, "opt": state.opt_state, "epoch": np.int32(4)}
    infos = open_source(tree).tensors()
    roles = {t.name: r for t, r in zip(infos, assign_roles(infos))}
    assert roles["opt/0/mu/hidden/kernel"].kind == "optimizer"
    assert roles["opt/0/mu/hidden/kernel"].slot_of == "params/hidden/kernel"
    assert roles["opt/0/nu/norm/scale"].slot_of == "params/norm/scale"
    assert roles["params/hidden/kernel"].kind == "param" and roles["epoch"].kind == "param"


def test_a_model_module_named_like_optax_fields_stays_a_param():
    """``mu``/``nu``/``count`` inside the model (a VAE head) are weights, not Adam moments."""
    tree = {"params": {"encoder": {"mu": {"kernel": np.ones((2, 3), np.float32)},
                                   "logvar": {"kernel": np.ones((2, 3), np.float32)}},
                       "count": np.ones(3, np.float32)}}
    infos = open_source(tree).tensors()
    assert {r.kind for r in assign_roles(infos)} == {"param"}


def test_ls_json_links_every_optax_moment_to_its_weight(tmp_path):
    state = trained_state("adamw")
    ckpt = save(state, "orbax", tmp_path)
    rows = json.loads(run_cli("ls", ckpt, "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["step"]["role"] == "meta"
    for name in param_values(state):
        assert by_name[name]["role"] == "param" and by_name[name]["slot_of"] is None
        leaf = name.removeprefix("params/")
        for moment in ("mu", "nu"):
            row = by_name[f"opt_state/0/{moment}/{leaf}"]
            assert (row["role"], row["slot_of"]) == ("optimizer", name)
    text = run_cli("ls", ckpt).stdout
    assert all(line.split()[-1] in ("param", "meta", "optimizer") or "slot of params/" in line
               for line in text.splitlines())


def test_ema_params_of_a_train_state_prefer_ema_and_hint(tmp_path):
    state = trained_state("adamw", cls=EmaTrainState, ema_params=None)
    ema = jax.tree_util.tree_map(lambda p: p * 0.5 + 1.0, state.params)
    state = state.replace(ema_params=ema)
    ckpt = save(state, "orbax", tmp_path)
    r = shardconv.convert(ckpt, tmp_path / "raw.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "raw.npz", param_values(state))
    assert any("EMA averages of" in n and "prefer_ema=True" in n for n in r.notes)  # the API speaks Python
    r = shardconv.convert(ckpt, tmp_path / "ema.npz", drop_optimizer=True, prefer_ema=True)
    assert_exactly(tmp_path / "ema.npz", param_values(state.replace(params=ema)))
    assert not any("EMA averages of" in n for n in r.notes)


def test_optax_ema_of_the_params_outside_the_optimizer_is_an_ema(tmp_path):
    state = trained_state("adamw")
    ema_tx = optax.ema(0.5, debias=False)
    ema_state = ema_tx.init(state.params)
    _, ema_state = ema_tx.update(jax.tree_util.tree_map(lambda p: p + 3.0, state.params), ema_state)
    tree = {"params": state.params, "opt_state": state.opt_state, "ema_state": ema_state}
    path = tmp_path / "t.msgpack"
    path.write_bytes(serialization.to_bytes(tree))
    shardconv.convert(path, tmp_path / "o.npz", drop_optimizer=True, prefer_ema=True)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(ema_state.ema), sep="/")
    assert_exactly(tmp_path / "o.npz", {f"params/{k}": np.asarray(v) for k, v in flat.items()})


def test_drop_optimizer_with_nothing_to_drop_says_so(tmp_path):
    r = shardconv.convert({"w": np.arange(4, dtype=np.float32)}, tmp_path / "o.npz", drop_optimizer=True)
    assert r.notes == ["drop_optimizer=True: the checkpoint holds no optimizer state, counters or EMA copies; "
                       "nothing was left out"]
    proc = run_cli("plan", TESTDATA / "tf-serving" / "saved_model_half_plus_three" / "00000123" / "variables" / "variables",
                   "--drop-optimizer")
    assert proc.returncode == 0 and "nothing was left out" in proc.stdout + proc.stderr


def test_t5x_drop_optimizer_keeps_exactly_the_target(tmp_path):
    ckpt = TESTDATA / "t5x" / "test_t5_tiny.checkpoint_0"
    names = [t.name for t in shardconv.list_tensors(ckpt)]
    shardconv.convert(ckpt, tmp_path / "o.npz", drop_optimizer=True)
    got = load_npz(tmp_path / "o.npz")
    assert sorted(got) == sorted(n for n in names if n.startswith("optimizer/target/"))
    assert shardconv.verify(tmp_path / "o.npz", ckpt, drop_optimizer=True)["tensors"] == len(got)
    rows = {r["name"]: r for r in json.loads(run_cli("ls", ckpt, "--json").stdout)}
    assert rows["optimizer/state/param_states/encoder/layers_0/mlp/wo/kernel/v_row"]["slot_of"] == \
        "optimizer/target/encoder/layers_0/mlp/wo/kernel"
    assert rows["optimizer/state/step"]["role"] == "meta"


# -- TensorFlow: checkpoints written in a subprocess by real TF (this process never imports it)

ESTIMATOR = TESTDATA / "ecosystem" / "tfx-estimator-tf1" / "model.ckpt-1000"

#: The estimator's model (DNNLinearCombinedClassifier): dnn layers and per-feature linear weights.
ESTIMATOR_MODEL = sorted(
    [f"dnn/hiddenlayer_{i}/{w}" for i in range(4) for w in ("kernel", "bias")]
    + ["dnn/logits/kernel", "dnn/logits/bias", "linear/linear_model/bias_weights"]
    + [f"linear/linear_model/{f}_xf/weights" for f in (
        "company", "dropoff_latitude", "dropoff_longitude", "payment_type", "pickup_latitude",
        "pickup_longitude", "trip_start_day", "trip_start_hour", "trip_start_month")])


def test_tf_estimator_drop_optimizer_keeps_only_the_model_weights(tmp_path):
    infos = shardconv.list_tensors(ESTIMATOR)
    roles = dict(zip((t.name for t in infos), assign_roles(infos)))
    assert sorted(n for n, r in roles.items() if r.kind == "param") == ESTIMATOR_MODEL
    for n, r in roles.items():
        if n.endswith(("/accumulator", "/linear")):
            assert r.kind == "optimizer" and r.slot_of == n.split("/", 2)[2].rsplit("/", 1)[0], n
    assert roles["global_step"].kind == roles["training/Ftrl/iter"].kind == "meta"
    r = shardconv.convert(ESTIMATOR, tmp_path / "o.npz", drop_optimizer=True)
    assert sorted(load_npz(tmp_path / "o.npz")) == ESTIMATOR_MODEL
    assert len(r.dropped) == len(infos) - len(ESTIMATOR_MODEL)
    assert shardconv.verify(tmp_path / "o.npz", ESTIMATOR, drop_optimizer=True)["tensors"] == len(ESTIMATOR_MODEL)


_TF_WRITER = textwrap.dedent('''
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf, keras
    out = sys.argv[1]
    model_values = {}

    def keep(kind, model):
        # A Keras 3 Sequential's weights are listed without the model's own name scope ("net/l1/kernel"
        # is "l1/kernel", as Keras 2 names it: docs/mapping.md, "TF2 names").
        model_values[kind] = {v.path.removeprefix(model.name + "/"): v.numpy().tolist() for v in model.weights}

    # The TF guide (training_checkpoints): step counter, optimizer and net in one Checkpoint.
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, name="l1")], name="net")
    opt = keras.optimizers.Adam(0.1)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(net(tf.ones((2, 3))) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
    ckpt = tf.train.Checkpoint(step=tf.Variable(1), optimizer=opt, net=net)
    ckpt.step.assign_add(1)
    print(ckpt.save(os.path.join(out, "guide", "ckpt")))
    keep("guide", net)

    # Keras 3: compiled with metrics, fitted, checkpointed with its optimizer.
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="d1"),
                          keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="d2")], name="clf")
    m.compile(optimizer=keras.optimizers.RMSprop(1e-3, momentum=0.5), loss="mse",
              metrics=["mae", keras.metrics.AUC(name="auc")])
    rng = np.random.default_rng(0)
    m.fit(rng.random((16, 4), dtype=np.float32), rng.random((16, 2)).round().astype("float32"), epochs=2, verbose=0)
    assert m.metrics_variables
    print(tf.train.Checkpoint(model=m, optimizer=m.optimizer).save(os.path.join(out, "keras3", "ckpt")))
    keep("keras3", m)

    # Keras 3 optimizers: every slot and hyperparameter.
    for opt in ["Adam", "AdamW", "Adamax", "Adagrad", "Ftrl", "RMSprop", "SGD", "Adadelta", "Nadam", "Lion"]:
        kw = {"momentum": 0.5} if opt in ("SGD", "RMSprop") else {}
        k = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")],
                             name="k_" + opt.lower())
        k.compile(optimizer=getattr(keras.optimizers, opt)(learning_rate=0.01, **kw), loss="mse")
        k.fit(rng.random((8, 3), dtype=np.float32), rng.random((8, 2), dtype=np.float32), epochs=2, verbose=0)
        print(tf.train.Checkpoint(model=k, optimizer=k.optimizer).save(os.path.join(out, "keras3-" + opt, "ckpt")))
        keep("keras3-" + opt, k)

    # Metric objects tracked beside a model (Keras 2 keeps them under keras_api/metrics).
    class Metric(tf.Module):
        def __init__(self):
            super().__init__()
            self.total = tf.Variable(7.5)
            self.count = tf.Variable(3.0)
    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
            self.metrics = [Metric(), Metric()]
    mod = Model()
    print(tf.train.Checkpoint(model=mod).save(os.path.join(out, "metrics", "ckpt")))
    model_values["metrics"] = {"model/w": mod.w.numpy().tolist()}

    # TF1 graph-mode optimizers, each in its own graph, saved with tf.compat.v1.train.Saver.
    v1 = tf.compat.v1
    for name, make in [("Adam", lambda: v1.train.AdamOptimizer(0.1)),
                       ("Momentum", lambda: v1.train.MomentumOptimizer(0.1, 0.9)),
                       ("RMSProp", lambda: v1.train.RMSPropOptimizer(0.1, momentum=0.5)),
                       ("Adagrad", lambda: v1.train.AdagradOptimizer(0.1)),
                       ("Adadelta", lambda: v1.train.AdadeltaOptimizer(0.1)),
                       ("Ftrl", lambda: v1.train.FtrlOptimizer(0.1)),
                       ("ProximalAdagrad", lambda: v1.train.ProximalAdagradOptimizer(0.1)),
                       ("AdagradDA", lambda: v1.train.AdagradDAOptimizer(
                           0.1, global_step=v1.train.get_or_create_global_step()))]:
        g = tf.Graph()
        with g.as_default():
            gs = v1.train.get_or_create_global_step()
            with v1.variable_scope("dense"):
                k = v1.get_variable("kernel", initializer=np.ones((3, 2), np.float32))
                b = v1.get_variable("bias", initializer=np.zeros(2, np.float32))
            loss = tf.reduce_sum((tf.matmul(tf.ones((4, 3)), k) + b) ** 2)
            train = make().minimize(loss, global_step=gs)
            with v1.Session(graph=g) as s:
                s.run(v1.global_variables_initializer())
                for _ in range(2):
                    s.run(train)
                print(v1.train.Saver().save(s, os.path.join(out, "tf1-" + name, "model.ckpt"), global_step=gs))
                model_values["tf1-" + name] = {"dense/kernel": s.run(k).tolist(), "dense/bias": s.run(b).tolist()}
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(model_values, f)
''')


@pytest.fixture(scope="module")
def tf_written(tmp_path_factory) -> Path:
    """Checkpoints written by TensorFlow/Keras 3 (one subprocess, one TF import) and their model values."""
    skip_unless_installed("tensorflow")  # TF runs in the child, never in this process
    out = tmp_path_factory.mktemp("tf_roles")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    proc = subprocess.run([sys.executable, "-c", _TF_WRITER, str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def model_values(tf_written: Path, kind: str) -> dict[str, np.ndarray]:
    raw = json.loads((tf_written / "model.json").read_text())[kind]
    return {name: np.asarray(v, dtype=np.float32) for name, v in raw.items()}


def test_tf_guide_checkpoint_step_is_meta_and_dropped(tf_written, tmp_path):
    ckpt = tf_written / "guide"
    rows = {r["name"]: r for r in json.loads(run_cli("ls", ckpt, "--json").stdout)}
    assert rows["step"]["role"] == "meta"
    want = model_values(tf_written, "guide")
    slots = [r for r in rows.values() if r["role"] == "optimizer" and r["slot_of"]]
    assert sorted(r["slot_of"] for r in slots) == sorted(list(want) * 2)  # Adam: momentum and velocity
    shardconv.convert(ckpt, tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", want)


def test_tf_guide_checkpoint_to_savedmodel_with_a_model_builder_and_drop_optimizer(tf_written, tmp_path):
    """The issue's case: ``step`` used to stay a param and match no model variable."""
    (tmp_path / "guide_net.py").write_text(
        "import keras\n\ndef build(config):\n    return keras.Sequential([keras.Input((3,)), "
        "keras.layers.Dense(5, name='l1')], name='net')\n")
    dest = tmp_path / "sm"
    proc = subprocess.run([sys.executable, "-m", "shardconv", "convert", tf_written / "guide", dest, "--to",
                           "savedmodel", "--model-builder", "guide_net:build", "--drop-optimizer", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr
    want = model_values(tf_written, "guide")
    assert shardconv.verify(dest, tf_written / "guide", drop_optimizer=True)["tensors"] == len(want)


def test_keras3_compiled_with_metrics_drop_optimizer_gives_its_weights(tf_written, tmp_path):
    ckpt = tf_written / "keras3"
    want = model_values(tf_written, "keras3")
    infos = shardconv.list_tensors(ckpt)
    roles = assign_roles(infos)
    params = {r.name for r in roles if r.kind == "param"}
    assert params == set(want)
    trainable = {n for n in want if not n.endswith(("moving_mean", "moving_variance"))}
    for kind in ("momentum", "velocity"):
        assert sorted(r.slot_of for r in roles if r.name.endswith("/" + kind)) == sorted(trainable)
    shardconv.convert(ckpt, tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", want)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "Adamax", "Adagrad", "Ftrl", "RMSprop", "SGD", "Adadelta",
                                       "Nadam", "Lion"])
def test_keras3_optimizer_slots_link_to_their_weights(tf_written, optimizer, tmp_path):
    ckpt = tf_written / f"keras3-{optimizer}"
    want = model_values(tf_written, f"keras3-{optimizer}")
    infos = shardconv.list_tensors(ckpt)
    roles = assign_roles(infos)
    assert {r.name for r in roles if r.kind == "param"} == set(want)
    slots = [(r, t) for r, t in zip(roles, infos) if r.kind == "optimizer" and t.shape]
    assert slots and all(r.slot_of in want and t.shape == want[r.slot_of].shape for r, t in slots), slots
    assert {r.slot_of for r, _ in slots} == set(want)
    assert all(r.slot_of is None for r, t in zip(roles, infos) if not t.shape)  # iterations, learning rate
    shardconv.convert(ckpt, tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", want)


def test_metric_variables_are_meta(tf_written, tmp_path):
    ckpt = tf_written / "metrics"
    infos = shardconv.list_tensors(ckpt)
    roles = {r.name: r.kind for r in assign_roles(infos) if r.kind != "meta" or "metrics" in r.name}
    assert roles == {"model/w": "param", "model/metrics/0/total": "meta", "model/metrics/0/count": "meta",
                     "model/metrics/1/total": "meta", "model/metrics/1/count": "meta"}
    shardconv.convert(ckpt, tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", model_values(tf_written, "metrics"))


@pytest.mark.parametrize("optimizer", ["Adam", "Momentum", "RMSProp", "Adagrad", "Adadelta", "Ftrl",
                                       "ProximalAdagrad", "AdagradDA"])
def test_tf1_optimizer_slots_are_dropped_and_linked(tf_written, optimizer, tmp_path):
    ckpt = tf_written / f"tf1-{optimizer}"
    infos = shardconv.list_tensors(ckpt)
    roles = {t.name: r for t, r in zip(infos, assign_roles(infos))}
    assert roles["global_step"].kind == "meta"
    slots = {n: r.slot_of for n, r in roles.items() if r.kind == "optimizer" and r.slot_of}
    assert slots and all(n.startswith(f"{s}/") for n, s in slots.items())
    shardconv.convert(ckpt, tmp_path / "o.npz", drop_optimizer=True)
    assert_exactly(tmp_path / "o.npz", model_values(tf_written, f"tf1-{optimizer}"))
