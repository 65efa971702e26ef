"""The mapping layer: EMA and optimizer handling on TF-written checkpoints, streamed
transforms checked against NumPy, and rule errors reported together."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from procs import baseline_rss, peak_rss, run_cli, shardconv_cmd
from reference import load_model_values, reference_prefix
from test_npz import load_npz

import shardconv
from shardconv.core.types import Role
from shardconv.errors import PlanError
from shardconv.mapping.roles import assign_roles
from shardconv.sources import open_source

MiB = 1 << 20


@pytest.mark.parametrize("fixture", ["keras_ema_ckpt", "tf1_ema_ckpt"])
def test_prefer_ema_and_drop_optimizer_give_exactly_the_model_with_ema_values(fixture, request, tmp_path):
    ckpt = request.getfixturevalue(fixture)
    model = load_model_values(ckpt)
    r = shardconv.convert(reference_prefix(ckpt), tmp_path / "o.npz", prefer_ema=True, drop_optimizer=True)
    got = load_npz(tmp_path / "o.npz")
    assert set(got) == set(model)
    for name, vals in model.items():
        want = vals.get("ema", vals["raw"])
        assert got[name].dtype == want.dtype and got[name].tobytes() == want.tobytes(), name
        if "ema" in vals:
            assert got[name].tobytes() != vals["raw"].tobytes(), name
    assert any("no EMA" in n for n in r.notes)


def test_keras_ema_preset_is_the_same_as_the_switches(keras_ema_ckpt, tmp_path):
    prefix = reference_prefix(keras_ema_ckpt)
    shardconv.convert(prefix, tmp_path / "a.npz", preset="keras-ema")
    shardconv.convert(prefix, tmp_path / "b.npz", prefer_ema=True, drop_optimizer=True)
    assert {k: v.tobytes() for k, v in load_npz(tmp_path / "a.npz").items()} == \
           {k: v.tobytes() for k, v in load_npz(tmp_path / "b.npz").items()}


def test_without_prefer_ema_the_raw_weights_are_written(keras_ema_ckpt, tmp_path):
    model = load_model_values(keras_ema_ckpt)
    shardconv.convert(reference_prefix(keras_ema_ckpt), tmp_path / "o.npz", drop_optimizer=True)
    got = load_npz(tmp_path / "o.npz")
    assert set(got) == set(model)
    for name, vals in model.items():
        assert got[name].tobytes() == vals["raw"].tobytes(), name


def test_ls_shows_the_names_rules_see_with_roles_and_raw_keys(keras_ema_ckpt):
    """TF2: ls lists model variable paths (what rules match) with each tensor's role and key."""
    model = load_model_values(keras_ema_ckpt)
    prefix = reference_prefix(keras_ema_ckpt)
    rows = json.loads(run_cli("ls", prefix, "--json").stdout)
    params = {r["name"] for r in rows if r["role"] == "param"}
    assert set(model) <= params
    emas = {r["ema_of"] for r in rows if r["role"] == "ema"}
    assert emas == {n for n, v in model.items() if "ema" in v}
    trainable = [r for r in rows if r["key"].startswith("optimizer/_trainable_variables/")]
    assert trainable and all(r["name"] in model for r in trainable)
    keys = json.loads(run_cli("ls", prefix, "--json", "--names", "keys").stdout)
    assert {r["name"] for r in keys} == {r["key"] for r in rows}
    text = run_cli("ls", prefix).stdout
    some = trainable[0]
    assert f"<- {some['key']}" in text and text.count("ema of ") == len(emas)


def test_optimizer_slot_variables_are_dropped_and_named_by_the_object_graph(tf2_v1_slots_ckpt, tmp_path):
    model = load_model_values(tf2_v1_slots_ckpt)
    with open_source(reference_prefix(tf2_v1_slots_ckpt)) as src:
        infos = src.tensors()
        slots = [r for t, r in zip(infos, assign_roles(infos)) if ".OPTIMIZER_SLOT" in t.name]
        assert slots and all(r.kind == Role.OPTIMIZER and r.slot_of in model for r in slots)
    shardconv.convert(reference_prefix(tf2_v1_slots_ckpt), tmp_path / "o.npz", drop_optimizer=True)
    got = load_npz(tmp_path / "o.npz")
    assert {k: v.tobytes() for k, v in got.items()} == {k: v["raw"].tobytes() for k, v in model.items()}


def test_prefer_ema_without_any_ema_is_an_error(tf2_v1_slots_ckpt):
    with pytest.raises(PlanError, match="no EMA values"):
        shardconv.api.plan(reference_prefix(tf2_v1_slots_ckpt), prefer_ema=True)


def test_tf_to_flax_dense_preset_names(keras_ema_ckpt):
    p = shardconv.api.plan(reference_prefix(keras_ema_ckpt), preset="tf-to-flax-dense")
    assert {o.name for o in p.outputs} == {
        "params/conv/kernel", "params/conv/bias", "params/bn/scale", "params/bn/bias",
        "batch_stats/bn/mean", "batch_stats/bn/var", "params/dense/kernel", "params/dense/bias"}


# ----------------------------------------------------------------- transforms

@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """48 MiB tensors written by NumPy, plus 8 per-layer tensors (6 MiB each)."""
    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("arrays")
    tree = {"big": rng.standard_normal((4096, 3072), dtype=np.float32),
            "qkv": rng.standard_normal((1024, 3 * 4096), dtype=np.float32)}
    for i in range(8):
        tree[f"layers_{i}/kernel"] = rng.standard_normal((1024, 1536), dtype=np.float32)
    np.savez(d / "in.npz", **tree)
    return d / "in.npz", tree


TRANSFORMS = {
    "transpose": ([{"match": "big", "rename": "big_t", "transpose": [1, 0]}],
                  lambda t: {"big_t": t["big"].T}),
    "stack": ([{"match": r"layers_(\d+)/kernel", "rename": "scan/kernel", "stack": {"axis": 0, "index": r"\1"}}],
              lambda t: {"scan/kernel": np.stack([t[f"layers_{i}/kernel"] for i in range(8)])}),
    "split": ([{"match": "qkv", "rename": "attn/{part}", "split": {"axis": 1, "sizes": [4096] * 3, "names": ["q", "k", "v"]}}],
              lambda t: dict(zip(["attn/q", "attn/k", "attn/v"], np.split(t["qkv"], 3, axis=1)))),
    "cast": ([{"match": "big", "cast": "bfloat16"}], lambda t: {"big": t["big"].astype(ml_dtypes.bfloat16)}),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMS))
def test_transforms_match_numpy_within_a_budget_smaller_than_the_tensor(arrays, tmp_path, case):
    src, tree = arrays
    rules, expect = TRANSFORMS[case]
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text("\n".join(
        "[[rules]]\n" + "\n".join(f"{k} = {json.dumps(v)}" if not isinstance(v, dict) else
                                  f"{k} = {{ {', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items())} }}"
                                  for k, v in r.items()) for r in rules) + "\n[[rules]]\nmatch = '.*'\ndrop = true\n")
    budget = 16 * MiB
    assert max(v.nbytes for v in tree.values()) > budget
    baseline = baseline_rss(src)
    rc, peak = peak_rss(shardconv_cmd("convert", src, tmp_path / "o.npz", "--rules", rules_file,
                                      "--max-memory", "16MiB", "--quiet"))
    assert rc == 0
    assert peak - baseline <= budget, f"{case}: peak {peak / MiB:.0f} MiB over baseline {baseline / MiB:.0f} MiB"
    got = load_npz(tmp_path / "o.npz")
    want = expect(tree)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k].view(np.uint8), np.ascontiguousarray(v).view(np.uint8)), k
    assert run_cli("verify", tmp_path / "o.npz", src).returncode == 0


def _small(tmp_path):
    rng = np.random.default_rng(5)
    tree = {"a": rng.standard_normal((6, 4, 5)).astype(np.float32),
            "b": rng.integers(-100, 100, (3, 7)).astype(np.int16),
            "c/0": rng.standard_normal((2, 3)).astype(np.float32),
            "c/1": rng.standard_normal((4, 3)).astype(np.float32)}
    np.savez(tmp_path / "s.npz", **tree)
    return tmp_path / "s.npz", tree


SMALL = {
    "reshape+transpose": ([{"match": "a", "reshape": [6, 20], "transpose": [1, 0]}], lambda t: {"a": t["a"].reshape(6, 20).T}),
    "transpose3d+cast": ([{"match": "a", "transpose": [2, 0, 1], "cast": "float64"}], lambda t: {"a": t["a"].transpose(2, 0, 1).astype(np.float64)}),
    "unstack axis 1": ([{"match": "a", "rename": "a/{i}", "unstack": {"axis": 1}}], lambda t: {f"a/{i}": t["a"][:, i] for i in range(4)}),
    "unstack after transpose": ([{"match": "a", "transpose": [2, 1, 0], "unstack": {"axis": 0}}], lambda t: {f"a/{i}": t["a"].T[i] for i in range(5)}),
    "concat axis 0": ([{"match": r"c/(\d)", "rename": "c", "concat": {"axis": 0, "index": r"\1"}}], lambda t: {"c": np.concatenate([t["c/0"], t["c/1"]])}),
    "stack axis 2 + cast": ([{"match": "b", "rename": "bs", "stack": {"axis": 2, "index": "0"}, "cast": "int64"}], lambda t: {"bs": t["b"][:, :, None].astype(np.int64)}),
    "split axis 2": ([{"match": "a", "split": {"axis": 2, "sizes": [2, 3], "names": ["x", "y"]}}], lambda t: {"a/x": t["a"][:, :, :2], "a/y": t["a"][:, :, 2:]}),
}


@pytest.mark.parametrize("case", sorted(SMALL))
@pytest.mark.parametrize("memory", ["1MiB", "64MiB"])
def test_small_transforms_match_numpy(tmp_path, case, memory):
    src, tree = _small(tmp_path)
    rules, expect = SMALL[case]
    out = tmp_path / "o.npz"
    shardconv.convert(src, out, rules=rules, allow_unmapped=True, max_memory=memory)
    got = load_npz(out)
    want = expect(tree)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == np.ascontiguousarray(v).tobytes(), k


def test_transposed_inputs_still_get_their_checksums_verified(arrays, tmp_path):
    src, _ = arrays
    r = shardconv.convert(src, tmp_path / "o.npz", rules=[{"match": "big", "transpose": [1, 0]}, {"match": ".*", "drop": True}])
    assert r.verified_units == 1


# ----------------------------------------------------------------- bad rules

def test_bad_rules_are_all_reported_together_naming_rule_and_tensor(tmp_path):
    src, _ = _small(tmp_path)
    rules = [
        {"match": "a(", "rename": "x"},                     # invalid regex
        {"match": "b", "transpse": [1, 0]},                  # unknown key
        {"match": "zz", "cast": "float128"},                 # unknown dtype
    ]
    with pytest.raises(PlanError) as e:
        shardconv.api.plan(src, rules=rules)
    msg = str(e.value)
    assert "rule 1" in msg and "invalid regex" in msg
    assert "rule 2" in msg and "transpse" in msg
    assert "rule 3" in msg and "float128" in msg
    assert len(e.value.problems) == 3


def test_plan_problems_name_the_tensors(tmp_path):
    src, _ = _small(tmp_path)
    rules = [
        {"match": "a", "reshape": [7, 7]},                   # impossible reshape
        {"match": "b", "rename": "c/0"},                     # collides with c/0
        {"match": "c/0"},
        {"match": "c/1", "cast": "int8"},                    # float -> int refused
    ]
    with pytest.raises(PlanError) as e:
        shardconv.api.plan(src, rules=rules)
    msg = str(e.value)
    assert "cannot reshape 'a'" in msg
    assert "map to the output name 'c/0'" in msg
    assert "floating point to integer" in msg


def test_unmapped_names_are_errors_unless_allowed_or_dropped(tmp_path):
    src, tree = _small(tmp_path)
    with pytest.raises(PlanError, match=r"no rule maps 'b'.*no rule maps 'c/0'"):
        shardconv.api.plan(src, rules=[{"match": "a"}])
    p = shardconv.api.plan(src, rules=[{"match": "a"}], allow_unmapped=True)
    assert {o.name for o in p.outputs} == set(tree)
    p = shardconv.api.plan(src, rules=[{"match": "a"}, {"match": ".*", "drop": True}])
    assert [o.name for o in p.outputs] == ["a"] and len(p.dropped) == 3


def test_stack_with_mismatched_shapes_is_an_error(tmp_path):
    src, _ = _small(tmp_path)
    with pytest.raises(PlanError, match=r"stack 's'.*has shape"):
        shardconv.api.plan(src, rules=[{"match": r"c/(\d)", "rename": "s", "stack": {"axis": 0, "index": r"\1"}},
                                       {"match": ".*", "drop": True}])


def test_rules_file_errors_are_one_line_on_the_cli(tmp_path):
    src, _ = _small(tmp_path)
    (tmp_path / "r.toml").write_text("[[rules]]\nmatch = 'a('\n[[rules]]\nmatch='b'\nreshape=[99]\n")
    p = run_cli("convert", src, tmp_path / "o.npz", "--rules", tmp_path / "r.toml")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "rule 1" in lines[0] and "invalid regex" in lines[0], p.stderr
    assert not (tmp_path / "o.npz").exists()


def test_plan_json_reports_outputs_coverage_and_memory_without_reading_values(keras_ema_ckpt):
    p = run_cli("plan", reference_prefix(keras_ema_ckpt), "--preset", "keras-ema", "--json", "--max-memory", "256MiB")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert len(report["outputs"]) == 8
    assert report["totals"]["bytes_out"] + report["totals"]["bytes_dropped"] == report["totals"]["bytes_in"]
    assert {d["reason"] for d in report["dropped"]} >= {"optimizer state (preset keras-ema)"}
    assert report["memory"]["peak"] > report["memory"]["buffers"]


@pytest.mark.parametrize("how", ["dtype", "rule"])
def test_a_scalar_is_cast_like_any_tensor(tmp_path, how):
    """A 0-d tensor cast by ``dtype`` or by a rule's ``cast`` (NumPy indexes a 0-d array with ``()``
    to a scalar, not a view, so the producer must ask for a view)."""
    tree = {"step_scale": np.float32(2.5), "w": np.array([1.5, -3.25, 65504.0], np.float32)}
    np.savez(tmp_path / "in.npz", **tree)
    mapping = {"dtype": "float16"} if how == "dtype" else {"rules": [{"match": ".*", "cast": "float16"}]}
    shardconv.convert(tmp_path / "in.npz", tmp_path / "o.npz", **mapping)
    got = load_npz(tmp_path / "o.npz")
    assert got["step_scale"].shape == () and got["step_scale"].dtype == np.float16 and got["step_scale"] == 2.5
    assert got["w"].dtype == np.float16 and got["w"].tobytes() == tree["w"].astype(np.float16).tobytes()
