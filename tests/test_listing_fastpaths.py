"""The shortcuts that make ``ls`` and ``plan`` of 100 000 tensors fast decide exactly what the
code they skip decides: each is checked here against that code, on names built from every
pattern it short-cuts and on random names (hypothesis)."""
from __future__ import annotations

import itertools
import re
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardconv.core import plan as core_plan
from shardconv.core.types import Role, SourceRole, TensorInfo
from shardconv.mapping import roles

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)

#: Pieces of names the role patterns and the name checks look at, and some they do not.
PIECES = ["model", "dense", "kernel", "w0", "Adam", "Adam_1", "LazyAdam", "AdamW", "Adamax", "Momentum", "RMSProp",
          "RMSprop", "RMSProp_1", "Adagrad", "AdagradDA", "ProximalAdagrad", "Adadelta", "Adafactor", "Ftrl", "LAMB",
          "Lamb", "LARS", "Lion", "Nadam", "SGD", "LossScaleOptimizer", "adam_m", "adam_v", "accumulator",
          "gradient_accumulator", ".OPTIMIZER_SLOT", "x_slot_v", "x_slot_vr", "x_slot_m", "global_step", "beta1_power",
          "beta2_power", "learning_rate", "iterations", "iteration", "optimizer", "ExponentialMovingAverage", "m", "v",
          "momentum", "lr", "opt_state", "ema_params", "params_ema", "count", "mu", "nu", "ema", "total", "metrics",
          "", ".", "..", "a\\b", "a\nb", "\x00", "x\x1f"]


def _names(max_parts: int = 3) -> list[str]:
    out = []
    for n in range(1, max_parts + 1):
        out += ["/".join(p) for p in itertools.product(PIECES[:n * 12 if n > 2 else None], repeat=n)]
    return out + ["/" + n for n in PIECES] + [n + "/" for n in PIECES]


def _children_by_walking(names) -> dict[str, set[str]]:
    """``_Tree``'s group children as it built them before ``_children``: each name part by part."""
    children: dict[str, set[str]] = defaultdict(set)
    for name in names:
        group = ""
        for part in name.split("/"):
            children[group].add(part)
            group = f"{group}/{part}" if group else part
    return children


def test_tree_children_are_those_of_the_part_by_part_walk():
    names = _names(2) + ["a/b/c", "a/b", "a//b", "/a/b", "//a", "", "a/", "a/b/", "opt_state/mu/x"]
    assert roles._children(names) == _children_by_walking(names)


@FUZZ
@given(st.lists(st.text(alphabet="ab/", max_size=8), max_size=12))
def test_tree_children_random(names):
    assert roles._children(names) == _children_by_walking(names)


def _info(name: str, dtype: str = "float32", shape: tuple[int, ...] = (4,)) -> TensorInfo:
    return TensorInfo(name, dtype, shape, 16)


def _by_name_unfiltered(monkeypatch: pytest.MonkeyPatch, t: TensorInfo, tree: roles._Tree):
    with monkeypatch.context() as m:
        m.setattr(roles, "_MAYBE_OPTIMIZER", re.compile(""))  # matches every name: the patterns decide
        return roles._by_name(t, tree)


def test_optimizer_prefilter_never_hides_a_match(monkeypatch):
    """Every name one of the patterns (or the Keras optimizer rule) recognises passes the prefilter."""
    names = _names()
    infos = [_info(n) for n in names]
    tree = roles._Tree(infos)
    recognised = 0
    for t in infos:
        expected = _by_name_unfiltered(monkeypatch, t, tree)
        assert roles._by_name(t, tree) == expected, t.name
        recognised += expected is not None
    assert recognised > 1000  # the corpus exercises the patterns, not only the prefilter


def test_tree_shortcut_agrees_with_the_walk():
    """``_Tree.role``'s early return gives what the loop gives, with and without tree roots."""
    plain = [_info(n) for n in _names(2)]
    rooted = plain + [_info(f"zz/{f}") for f in ("count", "mu", "nu")] + [_info("ee/count"), _info("ee/ema")]
    for infos in (plain, rooted):
        tree = roles._Tree(infos)
        walk = roles._Tree(infos)
        walk.plain = False
        assert [tree.role(t) for t in infos] == [walk.role(t) for t in infos]
    assert roles._Tree(plain).plain and not roles._Tree(rooted).plain


def test_metric_shortcut():
    for name in ["metrics/acc/total", "a/total", "metrics/total", "x/metrics/count", "total", "a/b"]:
        parts = name.split("/")
        slow = parts[-1] in roles._METRIC_VARS and any(p in roles.METRIC_CONTAINERS for p in parts[:-1])
        assert roles._is_metric(name) == slow


def test_assign_roles_remembers_only_the_same_infos_and_only_when_asked():
    a = [_info("dense/kernel"), _info("dense/kernel/Adam"), _info("global_step", "int64", ())]
    b = [TensorInfo(t.name, t.dtype, t.shape, t.nbytes, role=SourceRole(Role.META, t.name)) for t in a]
    with roles.remembering():
        first = roles.assign_roles(a)
        assert [r.kind for r in first] == [Role.PARAM, Role.OPTIMIZER, Role.META]
        assert roles.assign_roles(list(a)) == first and roles.assign_roles(list(a)) is not first
        assert roles._last is not None and roles._last[0] == tuple(a)
        # equal infos (roles do not take part in equality) that are other objects are decided again
        assert [r.kind for r in roles.assign_roles(b)] == [Role.META, Role.META, Role.META]
        assert [r.kind for r in roles.assign_roles(a[:2])] == [Role.PARAM, Role.OPTIMIZER]
    assert roles._last is None  # nothing held once planning is over
    roles.assign_roles(a)
    assert roles._last is None


def _check_name_slow(name: str) -> str | None:
    with pytest.MonkeyPatch.context() as m:
        m.setattr(core_plan, "_MAYBE_UNSAFE", re.compile(""))  # every name takes the full checks
        return core_plan.check_name(name)


def test_check_name_shortcut_on_every_unsafe_form():
    names = _names(2) + ["/a", "a/", "a//b", "a/./b", "a/..", "../a", "a\\b", "a\x00", "\t", "a/.b", "..a", "a..",
                         "a\n", "a/\n", "\x7f", "é/ü"]
    unsafe = 0
    for name in names:
        assert core_plan.check_name(name) == _check_name_slow(name), name
        unsafe += _check_name_slow(name) is not None
    assert unsafe > 100


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("ab./\\\x00\n\x1f\x7fé")), max_size=10))
def test_check_name_random(name):
    assert core_plan.check_name(name) == _check_name_slow(name)


def test_ls_table_escapes_each_line_once_any_is_unprintable(tmp_path, capsys):
    """``ls`` checks its whole table at once; a name with characters ``one_line`` escapes sends every line
    through ``one_line``, which escapes that one and leaves the others as they are."""
    import numpy as np

    from shardconv.cli import main

    src = tmp_path / "in.npz"
    np.savez(src, **{"ok/w": np.zeros(2, np.float32), "evil\u202ename\u2028": np.zeros(3, np.float32)})  # type: ignore[arg-type]
    assert main(["ls", str(src), "--quiet"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert lines[0].startswith("evil\\u202ename\\u2028 ") and lines[1].startswith("ok/w ")
    np.savez(src, **{"ok/w": np.zeros(2, np.float32)})  # type: ignore[arg-type]
    assert main(["ls", str(src), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("ok/w  float32")


def _roles_each(infos: list[TensorInfo]) -> list[roles.TensorRole]:
    """Roles as ``_decide`` gives them one tensor at a time, then linked: what the bulk path must give."""
    out = roles._assign_each(infos, [t.role for t in infos])
    roles._link(infos, out)
    return out


def _bulk_agrees(infos: list[TensorInfo]) -> bool:
    """Asserts the bulk roles (where the bulk path decides) are those of ``_roles_each``; True if it decided."""
    fast = roles._assign_fast(infos, [t.role for t in infos])
    if fast is not None:
        roles._link(infos, fast)
        assert fast == _roles_each(infos), [t.name for t in infos]
    assert roles.assign_roles(infos) == _roles_each(infos)
    return fast is not None


def _recorded_twins(infos: list[TensorInfo], kind: Role) -> list[TensorInfo]:
    return [TensorInfo(t.name, t.dtype, t.shape, t.nbytes, role=SourceRole(kind, f"m/{t.name}" if i % 2 else None))
            for i, t in enumerate(infos)]


def test_bulk_roles_agree_with_one_by_one():
    """Each corpus name with a weight it may belong to, as a float tensor and as an integer counter,
    unrecorded and recorded: the bulk roles are those of ``_decide``, and the bulk path decided most."""
    decided = tried = 0
    for name in _names(2):
        infos = [_info("dense/kernel"), _info(name), _info(name, "int64", ()), _info(f"{name}/x"),
                 _info(f"dense/kernel/{name}")]
        for group in (infos, _recorded_twins(infos, Role.PARAM), _recorded_twins(infos, Role.OPTIMIZER)):
            tried += 1
            decided += _bulk_agrees(group)
    assert decided > tried // 2 and decided < tried  # both the bulk path and the fallback were taken


@FUZZ
@given(st.lists(st.lists(st.sampled_from(PIECES[:40]), min_size=1, max_size=3).map("/".join), max_size=8),
       st.booleans())
def test_bulk_roles_random(names, counters):
    infos = [_info(n, "int64", ()) if counters and i % 2 else _info(n) for i, n in enumerate(names)]
    _bulk_agrees(infos)
    _bulk_agrees(_recorded_twins(infos, Role.EMA))


def test_optimizer_part_prefilter_covers_every_word():
    """A name ``_MAYBE_OPTIMIZER`` matches has a part ``_MAYBE_OPTIMIZER_PART`` matches."""
    words = roles._MAYBE_OPTIMIZER.pattern.replace("\\.", ".").split("|")
    for w in words:
        name = f"x/a{w}b/y"
        assert roles._MAYBE_OPTIMIZER.search(name), w
        assert any(roles._MAYBE_OPTIMIZER_PART.search(p) for p in name.split("/")), w


def test_flagged_finds_each_matching_name_and_refuses_newlines():
    names = ["a/b", "x/global_step", "c/Adam", "d", "e/total", "f/step/g"]
    assert roles._flagged(names, roles._MAYBE_NOT_PARAM) == {1, 2, 4}
    assert roles._flagged(["a\nstep", "b"], roles._MAYBE_NOT_PARAM) is None


def _escaped_lines_slow(lines: list[str]) -> str:
    """``cli._escaped_lines`` as it was: the table checked by ``isprintable``, each line escaped if that fails."""
    from shardconv.cli import one_line

    if not "".join(lines).isprintable():
        lines = [one_line(line) for line in lines]
    return "".join(f"{line}\n" for line in lines)


def test_escaped_lines_shortcut_on_every_ascii_character():
    from shardconv.cli import _escaped_lines

    for c in map(chr, range(128)):
        for lines in ([f"a{c}b", "ok"], [c], ["ok", f"x{c}"], [f"{c}\u00e9"]):
            assert _escaped_lines(lines) == _escaped_lines_slow(lines), repr(c)
    assert _escaped_lines([]) == "" and _escaped_lines(["a\nb"]) == "a\\nb\n"


@FUZZ
@given(st.lists(st.text(alphabet=st.sampled_from(list("a /\n\t\x00\x1b\x7f\x85é\u2028\u202e")), max_size=6), max_size=5))
def test_escaped_lines_random(lines):
    from shardconv.cli import _escaped_lines

    assert _escaped_lines(lines) == _escaped_lines_slow(lines)


def test_names_safe_only_where_check_name_finds_nothing():
    names = _names(2) + ["/a", "a/", "a//b", "a/./b", "a/..", "../a", "a\\b", "a\x00", "\t", "a/.b", "..a", "a..",
                         "a\n", "a/\n", "\x7f", "é/ü", "\udc80", "", "a\x85b"]
    for name in names:
        if core_plan.names_safe([name]):
            assert core_plan.check_name(name) is None, name
        for other in ("model/w", "x"):
            if core_plan.names_safe([other, name]) or core_plan.names_safe([name, other]):
                assert core_plan.check_name(name) is None, name
    safe = [n for n in names if core_plan.check_name(n) is None and "." not in n and "\n" not in n]
    assert len(safe) > 1000 and core_plan.names_safe(safe) and core_plan.names_safe([])
    assert not core_plan.names_safe(["a", ""]) and not core_plan.names_safe(["a\nb"])


@FUZZ
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab./\\\x00\n\x1f\x7fé")), max_size=6), max_size=4))
def test_names_safe_random(names):
    if core_plan.names_safe(names):
        assert all(core_plan.check_name(n) is None for n in names)


def test_output_sizes_are_nbytes():
    from shardconv.core.plan import Copy, OutputTensor

    outs = [OutputTensor("a", d, s, Copy("a")) for d in ("float32", "int8", "bfloat16", "complex128", "bool")
            for s in ((), (0,), (3, 4), (2**20, 7))]
    assert core_plan.output_sizes(outs) == [o.nbytes for o in outs] and core_plan.output_sizes([]) == []


def _plan_outcome(source, **options):
    from shardconv.api import make_plan
    from shardconv.errors import ShardconvError

    try:
        p = make_plan(source, **options)
    except ShardconvError as e:
        return type(e), str(e)
    return p.describe(), p.dropped, p.notes, p.options, [o.producer.inputs for o in p.outputs]


OPTIONS = [{}, {"names": "keys"}, {"prefer_ema": True}, {"drop_optimizer": True}, {"include": "*kernel*"},
           {"exclude": ["*Adam*"]}, {"dtype": "float16"}, {"rules": [{"match": "(.*)", "rename": "x/\\1"}]}]


def test_copies_shortcut_agrees_with_the_general_path(monkeypatch, tf1_dtypes_ckpt, tf2_keras_ckpt, keras_ema_ckpt,
                                                      tf1_ema_ckpt, savedmodel_ckpt):
    """Plans of checkpoints with strings, optimizer state and EMAs, under each kind of option: the
    same plan with ``_copies`` as without it, and ``_copies`` decided some of them."""
    from shardconv.mapping import planner
    from shardconv.sources import open_source

    real, decided = planner._copies, []

    def spy(*a):
        out = real(*a)
        decided.append(out is not None)
        return out

    for ckpt in (tf1_dtypes_ckpt, tf2_keras_ckpt, keras_ema_ckpt, tf1_ema_ckpt, savedmodel_ckpt / "sm"):
        with open_source(ckpt) as source:
            for options in OPTIONS:
                with monkeypatch.context() as m:
                    m.setattr(planner, "_copies", spy)
                    fast = _plan_outcome(source, **options)
                with monkeypatch.context() as m:
                    m.setattr(planner, "_copies", lambda *a: None)
                    assert fast == _plan_outcome(source, **options), (ckpt, options)
    assert any(decided) and not all(decided)


def test_copies_made_at_once_are_the_constructors(monkeypatch):
    """``core.plan.copies`` (slots set column by column, no ``__init__``) makes what the constructors
    make, field by field, and refuses the shortcut for any class it does not fit."""
    import dataclasses

    args = (["a", "b/c", ""], ["float32", "int8", "bfloat16"], [(2, 3), (), (0,)], ["x", "y", "z"])
    assert core_plan._BULK
    fast = core_plan.copies(*args)
    made = [core_plan.OutputTensor(n, d, s, core_plan.Copy(src)) for n, d, s, src in zip(*args)]
    assert fast == made and list(map(repr, fast)) == list(map(repr, made))
    assert [(o.name, o.dtype, o.shape, type(o.producer), o.producer.source, o.producer.inputs) for o in fast] == \
        [(o.name, o.dtype, o.shape, type(o.producer), o.producer.source, o.producer.inputs) for o in made]
    assert not hasattr(fast[0], "__dict__") and not hasattr(fast[0].producer, "__dict__")
    monkeypatch.setattr(core_plan, "_BULK", False)
    assert core_plan.copies(*args) == made and core_plan.copies([], [], [], []) == []

    @dataclasses.dataclass
    class Plain:
        source: str

    @dataclasses.dataclass(slots=True)
    class Posted:
        source: str

        def __post_init__(self) -> None:
            pass

    assert core_plan._plain_slotted(core_plan.Copy, ("source",))
    assert not any(core_plan._plain_slotted(c, ("source",)) for c in (Plain, Posted, core_plan.OutputTensor))


def _table_slow(columns: list[list[str]]) -> str:
    """What ``cli._table`` must write: its lines joined from their pieces, as ``_escaped_lines`` does."""
    return _escaped_lines_slow(list(map("".join, zip(*columns))))


def test_table_shortcut_on_every_ascii_character():
    from shardconv.cli import _table

    for c in map(chr, range(128)):
        for columns in ([[f"a{c}b", "ok"], ["  x", "  y"]], [[c]], [["ok", "n"], ["  <- ", "  <- "], ["k", f"x{c}"]],
                        [[f"{c}\u00e9"], [""]]):
            assert _table(columns) == _table_slow(columns), repr(c)
    assert _table([[]]) == "" and _table([["a\nb"], ["c"]]) == "a\\nbc\n"


@FUZZ
@given(st.lists(st.tuples(*[st.text(alphabet=st.sampled_from(list("a /\n\t\x00\x1b\x7f\x85é\u2028\u202e")), max_size=4)] * 3),
                min_size=1, max_size=5))
def test_table_random(rows):
    from shardconv.cli import _table

    columns = [list(c) for c in zip(*rows)]
    assert _table(columns) == _table_slow(columns)


def test_ls_text_names_each_key_not_shown_as_its_name():
    """``ls``'s table adds ``<- key`` where the name shown is not the key: on every line, on some, on none."""
    from shardconv.cli import _ls_text, format_size

    infos = [TensorInfo(f"k/{i}", "float32", (i, 2), 8 * i) for i in range(4)]
    rs = [roles.TensorRole(Role.PARAM, f"m/{i}", None, None) for i in range(4)]
    for shown in ([f"m/{i}" for i in range(4)], ["k/0", "m/1", "k/2", "m/3"], [t.name for t in infos]):
        width = max(4, *map(len, shown))
        expected = [f"{n.ljust(width)}  float32   {str(list(t.shape)):<20} {format_size(t.nbytes):>10}  param"
                    + ("" if n == t.name else f"  <- {t.name}") for n, t in zip(shown, infos)]
        assert _ls_text(shown, infos, rs) == "\n".join(expected) + "\n", shown


def test_ls_sorts_rows_by_the_name_shown_unless_already_sorted(tmp_path, capsys):
    """``ls`` sorts its rows only where the names are out of order, anywhere in the list."""
    import numpy as np

    from shardconv.cli import main

    for order in (["a", "c", "b", "d"], ["a", "b", "c", "d"], ["d", "c", "b", "a"], ["a", "b", "d", "c"]):
        src = tmp_path / "in.npz"
        np.savez(src, **{n: np.zeros(i + 1, np.float32) for i, n in enumerate(order)})  # type: ignore[arg-type]
        assert main(["ls", str(src), "--quiet"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert [(r[0], r[2]) for r in rows] == sorted((n, f"[{i + 1}]") for i, n in enumerate(order)), order


def test_bulk_roles_keep_each_recorded_link():
    """Recorded roles with the weight an EMA averages or a slot belongs to: the bulk path keeps each
    field where ``_decide`` puts it."""
    recorded = [SourceRole(Role.PARAM, "m/w"), SourceRole(Role.EMA, "m/w_ema", ema_of="m/w"),
                SourceRole(Role.OPTIMIZER, "m/w_m", slot_of="m/w"), SourceRole(Role.OPTIMIZER, "opt/lr"),
                SourceRole(Role.META, "step")]
    infos = [TensorInfo(f"k{i}", "float32", (2,), 8, role=r) for i, r in enumerate(recorded)]
    assert _bulk_agrees(infos)
    got = roles.assign_roles(infos)
    assert [(r.kind, r.name, r.ema_of, r.slot_of) for r in got[:3]] == [
        (Role.PARAM, "m/w", None, None), (Role.EMA, "m/w_ema", "m/w", None), (Role.OPTIMIZER, "m/w_m", None, "m/w")]
