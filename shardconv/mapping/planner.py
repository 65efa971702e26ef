"""Build a Plan from a source: names and roles, EMA/optimizer switches, then rules.

Reads no values. Every problem (unmapped names, collisions, impossible shapes)
is collected and reported together in one PlanError.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter, itemgetter
from typing import Any

from ..core.plan import Copy, OutputTensor, Plan, check_name, copies, names_safe
from ..core.types import Role, TensorInfo
from ..errors import PlanError
from ..frontend import option
from ..sources.base import Source
from ..util.dtypes import STRING, numpy_dtype
from .assemble import Assemble, Piece, check_piece
from .options import DEFAULTS, MappingOptions, Resolved, resolve
from .roles import TensorRole, assign_roles
from .rules import Rule, RuleSet, parse_rules
from .select import check_options, select

__all__ = ["DEFAULTS", "MappingOptions", "build_plan", "cast_problem"]


@dataclass
class _Item:
    name: str
    src: TensorInfo
    role: TensorRole
    notes: list[str] = field(default_factory=list)
    cast: str | None = None  # the global dtype option, for a floating-point tensor no rule casts


@dataclass
class _Build:
    """What planning collects on the way: problems (reported together), tensors left out, notes."""

    loc: str
    opts: dict[str, Any]
    settings: Resolved
    problems: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def shown(self, it: _Item | TensorInfo, role: TensorRole) -> str:
        """The name a tensor goes by under the ``names`` option."""
        src = it if isinstance(it, TensorInfo) else it.src
        return role.name if self.opts["names"] == "model" else src.name


def cast_problem(src: str, dst: str) -> str | None:
    """Casts that can lose information silently are refused (float -> int, narrowing ints)."""
    a, b = numpy_dtype(src), numpy_dtype(dst)
    if a == b:
        return None
    fa, fb = a.kind in "fcV", b.kind in "fcV"
    if b.kind == "c" and a.kind != "c" or a.kind == "c" and b.kind != "c":
        return f"cannot cast {src} to {dst} (complex and real)"
    if fa and not fb:
        return f"cannot cast {src} to {dst} (floating point to integer loses values)"
    if a.kind in "iu" and b.kind in "iu" and (b.itemsize < a.itemsize or (a.kind == "i" and b.kind == "u")
                                               or (a.kind == "u" and b.kind == "i" and b.itemsize == a.itemsize)):
        return f"cannot cast {src} to {dst} (values may not fit)"
    return None


def _expand(m: re.Match, template: str) -> str:
    return m.expand(template.replace("{part}", "\x00part\x00").replace("{i}", "\x00i\x00"))


def build_plan(source: Source, mapping: MappingOptions | None = None) -> Plan:
    """The plan for ``source`` under the mapping options (None: all defaults): roles, EMA,
    optimizer state, selection, then rules. Reads no values.

    Returns: the Plan. Raises: PlanError listing every problem; UsageError for an unknown
    preset or an unreadable rules file."""
    settings = resolve(mapping or MappingOptions())
    ruleset = parse_rules(settings.rules or None, settings.file_options)
    b = _Build(source.location, {**DEFAULTS, **ruleset.options, **settings.overrides}, settings)
    if b.opts["names"] not in ("model", "keys"):
        raise PlanError([f"names must be 'model' or 'keys', got {b.opts['names']!r}"])
    bad = check_options(b.opts)
    if bad:
        raise PlanError(bad)
    outputs = _copies(source, ruleset, b)
    if outputs is None:
        items = _assign_roles(source, b)
        items = _apply_ema(items, b)
        if b.opts["drop_optimizer"]:
            items = _drop_optimizer(items, b.dropped, b.notes, settings.by("drop_optimizer"))
        items = select(items, b.opts, b.dropped)
        outputs = _apply_rules(items, ruleset, b)
    _check_outputs(outputs, b)
    if b.problems:
        raise PlanError([p.removeprefix(f"{b.loc}: ") for p in b.problems], where=b.loc)
    if not source.stores_checksums and source.input_files():
        b.notes.append(f"{source.format} input stores no checksums: a change to it during the run is detected "
                       "only from file metadata (size, times, inode)")
    plan = Plan(source, outputs, b.dropped, {**b.opts, "rules": [r.raw for r in ruleset.rules]})
    plan.notes = b.notes
    return plan


def _copies(source: Source, ruleset: RuleSet, b: _Build) -> list[OutputTensor] | None:
    """The outputs where the options leave each numeric tensor as it is (no rules, ``prefer_ema``,
    ``drop_optimizer``, selection or ``dtype``) and the checkpoint holds no EMA (which would add a
    note): a Copy of each under the name ``names`` says, strings left out, as the general path
    makes them, but column by column (no ``_Item`` per tensor, 100 000 in a big index). None
    where the general path decides."""
    o = b.opts
    if ruleset.rules or o["prefer_ema"] or o["drop_optimizer"] or o.get("include") or o.get("exclude") or o.get("dtype"):
        return None
    infos = source.tensors()
    roles = assign_roles(infos)
    if Role.EMA in set(map(itemgetter(0), roles)):
        return None
    keys = list(map(attrgetter("name"), infos))
    names = list(map(itemgetter(1), roles)) if o["names"] == "model" else keys
    dtypes = list(map(attrgetter("dtype"), infos))
    shapes = list(map(tuple, map(attrgetter("shape"), infos)))
    if STRING in dtypes:
        strings = [i for i, dtype in enumerate(dtypes) if dtype == STRING]
        b.dropped.extend((names[i], "string tensor (array outputs hold numbers only)") for i in strings)
        keep = list(map(STRING.__ne__, dtypes))
        names, dtypes, shapes, keys = (list(compress(c, keep)) for c in (names, dtypes, shapes, keys))
    return copies(names, dtypes, shapes, keys)


def _assign_roles(source: Source, b: _Build) -> list[_Item]:
    """Each numeric tensor as an item named as the ``names`` option says; strings are left out."""
    items: list[_Item] = []
    infos = list(source.tensors())
    model_names = b.opts["names"] == "model"  # what ``b.shown`` decides, once rather than per tensor
    for t, role in zip(infos, assign_roles(infos)):
        if t.dtype == STRING:
            b.dropped.append((b.shown(t, role), "string tensor (array outputs hold numbers only)"))
            continue
        items.append(_Item(role.name if model_names else t.name, t, role))
    return items


def _apply_ema(items: list[_Item], b: _Build) -> list[_Item]:
    """With ``prefer_ema``: each param takes its EMA's value (an EMA without its raw weight
    becomes the param); without it, a note that EMAs exist."""
    emas = [it for it in items if it.role.kind == Role.EMA]
    by = b.settings.by("prefer_ema")
    if not b.opts["prefer_ema"]:
        if emas:
            shown = ", ".join(sorted({e.role.ema_of or e.name for e in emas})[:3])
            b.notes.append(f"the checkpoint holds EMA averages of {len(emas)} weight(s) (e.g. {shown}); "
                           f"{option('prefer_ema')} writes them under the weights' names")
        return items
    if not emas:
        b.problems.append(f"{b.loc}: {by}, but the checkpoint holds no EMA values (looked for Keras "
                          "use_ema averages, .../ExponentialMovingAverage shadows, flax ema_params and "
                          "optax EmaState trees; see docs/mapping.md)")
    consumed = _take_emas(items, emas, b, by)
    items = [it for it in items if id(it) not in consumed]
    raw = [it.name for it in items if it.role.kind == Role.PARAM and not it.notes]
    if raw:
        b.notes.append(f"{by}: {len(raw)} parameter(s) have no EMA and keep their raw value "
                       f"(e.g. {', '.join(raw[:3])})")
    return items


def _take_emas(items: list[_Item], emas: list[_Item], b: _Build, by: str) -> set[int]:
    """Give each param its EMA's source tensor; returns the ids of the EMA items used up."""
    params = {it.role.name: it for it in items if it.role.kind == Role.PARAM}
    seen: dict[str | None, _Item] = {}
    consumed: set[int] = set()
    for e in emas:
        target = e.role.ema_of
        if target in seen:
            b.problems.append(f"{b.loc}: two EMA values for {target!r}: {seen[target].src.name} and {e.src.name}")
            continue
        seen[target] = e
        p = params.get(target) if target is not None else None
        if p is None:  # only the average was saved: it is the model's value
            e.role = TensorRole(Role.PARAM, target or e.role.name)
            e.name = b.shown(e, e.role)
            e.notes.append(f"EMA {e.src.name} (its raw weight is not in the checkpoint)")
        elif (p.src.dtype, p.src.shape) != (e.src.dtype, e.src.shape):
            b.problems.append(f"{b.loc}: EMA {e.src.name} is {e.src.dtype}{list(e.src.shape)} but {target} is "
                              f"{p.src.dtype}{list(p.src.shape)}")
        else:
            b.dropped.append((p.name, f"raw weight; its EMA is written under the model name ({by})"))
            p.notes.append(f"EMA value from {e.src.name}")
            p.src = e.src
            consumed.add(id(e))
    return consumed


def _apply_rules(items: list[_Item], ruleset: RuleSet, b: _Build) -> list[OutputTensor]:
    """The output tensors: each item through the first rule matching its name (or as it is)."""
    outputs: list[OutputTensor] = []
    groups: dict[tuple[int, str], list[tuple[int, _Item, Rule]]] = defaultdict(list)
    for it in items:
        hit = ruleset.first_match(it.name) if ruleset.rules else None
        if hit is None:
            if ruleset.rules and not b.opts["allow_unmapped"]:
                b.problems.append(f"no rule maps {it.name!r}"
                                  + (f" (source {it.src.name})" if it.src.name != it.name else ""))
            else:
                _single(it, it.name, None, outputs, b.problems)
            continue
        rule, m = hit
        if rule.drop:
            b.dropped.append((it.name, f"dropped by {rule.label}"))
            continue
        new = _expand(m, rule.rename) if rule.rename is not None else it.name
        if not rule.group:
            _single(it, new, rule, outputs, b.problems)
            continue
        try:
            idx = int(m.expand(rule.group_index or ""))
        except (ValueError, IndexError, re.error):
            b.problems.append(f"{rule.label}: index {rule.group_index!r} of {it.name!r} is not an integer")
            continue
        groups[(rule.index, new)].append((idx, it, rule))
    for (_, new), members in groups.items():
        _group(new, members, outputs, b.problems)
    return outputs


def _check_outputs(outputs: list[OutputTensor], b: _Build) -> None:
    """Refuse two outputs with one name, and unsafe output names."""
    names = [o.name for o in outputs]
    if len(set(names)) == len(names) and names_safe(names):  # the common case, decided at once
        return
    first = {o.name: o for o in outputs}
    if len(first) == len(outputs):  # every name once (the common case): no grouping needed
        for name, o in first.items():
            why = check_name(name)
            if why:
                srcs = sorted(set(o.producer.inputs))
                b.problems.append(f"output name {name!r} (from {', '.join(srcs[:3])}) is unsafe ({why})")
        return
    by_name: dict[str, list[OutputTensor]] = defaultdict(list)
    for o in outputs:
        by_name[o.name].append(o)
    for name, outs in by_name.items():
        srcs = sorted({s for o in outs for s in o.producer.inputs}) if len(outs) > 1 else []
        if len(outs) > 1:
            b.problems.append(f"{len(outs)} tensors map to the output name {name!r}: {', '.join(srcs[:6])}")
        why = check_name(name)
        if why:
            srcs = srcs or sorted({s for o in outs for s in o.producer.inputs})
            b.problems.append(f"output name {name!r} (from {', '.join(srcs[:3])}) is unsafe ({why})")


_DROP_REASONS = {
    Role.OPTIMIZER: "optimizer state ({by})",
    Role.META: "training counter, metric or checkpoint bookkeeping ({by})",
    Role.EMA: "EMA copy ({by}; add {prefer_ema} to write it instead of the raw weight)",
}


def _drop_optimizer(items: list[_Item], dropped: list[tuple[str, str]], notes: list[str], by: str) -> list[_Item]:
    """``items`` without optimizer state, counters, bookkeeping and EMA copies; says so when there is
    none. ``by``: the option or preset that asked for it, as the user gave it."""
    keep = [it for it in items if it.role.kind not in _DROP_REASONS]
    dropped.extend((it.name, _DROP_REASONS[it.role.kind].format(by=by, prefer_ema=option("prefer_ema")))
                   for it in items if it.role.kind in _DROP_REASONS)
    if len(keep) == len(items):
        notes.append(f"{by}: the checkpoint holds no optimizer state, counters or EMA copies; "
                     "nothing was left out")
    return keep


def _base(it: _Item, rule: Rule | None, problems: list[str]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(view shape, permutation) after the rule's reshape and transpose."""
    shape = tuple(it.src.shape)
    view = shape
    label = rule.label if rule else "identity"
    if rule and rule.reshape is not None:
        target = list(rule.reshape)
        known = math.prod(x for x in target if x != -1)
        total = math.prod(shape)
        if -1 in target:
            if known == 0 or total % known:
                problems.append(f"{label}: cannot reshape {it.name!r} of shape {list(shape)} to {list(rule.reshape)}")
                return None
            target[target.index(-1)] = total // known
        if math.prod(target) != total:
            problems.append(f"{label}: cannot reshape {it.name!r} of shape {list(shape)} to {list(rule.reshape)}")
            return None
        view = tuple(target)
    perm = tuple(range(len(view)))
    if rule and rule.transpose is not None:
        if len(rule.transpose) != len(view):
            problems.append(f"{label}: transpose {list(rule.transpose)} does not fit {it.name!r} of shape {list(view)}")
            return None
        perm = rule.transpose
    return view, perm


def _dtype(it: _Item, rule: Rule | None, problems: list[str]) -> str | None:
    if rule is None or rule.cast is None:
        return it.cast or it.src.dtype
    why = cast_problem(it.src.dtype, rule.cast)
    if why:
        problems.append(f"{rule.label}: {it.name!r}: {why}")
        return None
    return rule.cast


def _full(shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in shape)


def _make(name: str, shape: tuple[int, ...], dtype: str, pieces: list[Piece], in_dtypes: dict[str, str],
          ops: list[str], problems: list[str]) -> OutputTensor | None:
    for p in pieces:
        why = check_piece(p, shape)
        if why:
            problems.append(f"{name!r}: {why}")
            return None
    if "cast" not in ops and any(in_dtypes[p.input] != dtype for p in pieces):
        ops = [*ops, "cast"]  # the global dtype option
    identity = (len(pieces) == 1 and pieces[0].perm == tuple(range(len(pieces[0].view)))
                and pieces[0].box == _full(pieces[0].view) and in_dtypes[pieces[0].input] == dtype)
    if identity:
        return OutputTensor(name, dtype, shape, Copy(pieces[0].input))
    return OutputTensor(name, dtype, shape, Assemble(shape, dtype, pieces, in_dtypes, ops))


def _ops(rule: Rule | None) -> list[str]:
    if rule is None:
        return []
    return [k for k in ("reshape", "transpose", "split", "unstack", "stack", "concat", "cast") if k in rule.raw]


def _single(it: _Item, new: str, rule: Rule | None, outputs: list[OutputTensor], problems: list[str]) -> None:
    """The output(s) one input becomes under ``rule`` (None: as it is, cast by the dtype option)."""
    if rule is None and it.cast in (None, it.src.dtype):  # a copy: what _make finds, without the pieces
        outputs.append(OutputTensor(new, it.src.dtype, tuple(it.src.shape), Copy(it.src.name)))
        return
    base = _base(it, rule, problems)
    dtype = _dtype(it, rule, problems)
    if base is None or dtype is None:
        return
    view, perm = base
    shape = tuple(view[a] for a in perm)
    in_dtypes = {it.src.name: it.src.dtype}
    ops = _ops(rule)
    label = rule.label if rule else ""
    if rule and rule.split is not None:
        axis, sizes, names = rule.split["axis"], rule.split["sizes"], rule.split["names"]
        if not 0 <= axis < len(shape) or sum(sizes) != shape[axis]:
            problems.append(f"{label}: cannot split {it.name!r} of shape {list(shape)} into {sizes} along axis {axis}")
            return
        start = 0
        for size, part in zip(sizes, names):
            box = list(_full(view))
            box[perm[axis]] = (start, start + size)
            out_shape = shape[:axis] + (size,) + shape[axis + 1:]
            name = new.replace("\x00part\x00", part) if "\x00part\x00" in new else f"{new}/{part}"
            o = _make(name, out_shape, dtype, [Piece(it.src.name, view, tuple(box), perm, _full(out_shape))],
                      in_dtypes, ops, problems)
            if o:
                outputs.append(o)
            start += size
        return
    if rule and rule.unstack_axis is not None:
        axis = rule.unstack_axis
        if not 0 <= axis < len(shape):
            problems.append(f"{label}: cannot unstack {it.name!r} of shape {list(shape)} along axis {axis}")
            return
        out_shape = shape[:axis] + shape[axis + 1:]
        for i in range(shape[axis]):
            box = list(_full(view))
            box[perm[axis]] = (i, i + 1)
            name = new.replace("\x00i\x00", str(i)) if "\x00i\x00" in new else f"{new}/{i}"
            o = _make(name, out_shape, dtype, [Piece(it.src.name, view, tuple(box), perm, _full(out_shape))],
                      in_dtypes, ops, problems)
            if o:
                outputs.append(o)
        return
    o = _make(new, shape, dtype, [Piece(it.src.name, view, _full(view), perm, _full(shape))], in_dtypes, ops, problems)
    if o:
        outputs.append(o)


def _group(new: str, members: list[tuple[int, _Item, Rule]], outputs: list[OutputTensor], problems: list[str]) -> None:
    rule = members[0][2]
    label = rule.label
    members.sort(key=lambda m: m[0])
    idx = [m[0] for m in members]
    if idx != list(range(len(members))):
        problems.append(f"{label}: {rule.group} {new!r}: indices {idx[:10]} are not 0..{len(members) - 1}")
        return
    bases = []
    for _, it, r in members:
        b = _base(it, r, problems)
        d = _dtype(it, r, problems)
        if b is None or d is None:
            return
        view, perm = b
        bases.append((it, view, perm, tuple(view[a] for a in perm), d))
    dtypes = {b[4] for b in bases}
    src_dtypes = {b[0].src.dtype for b in bases}
    if len(dtypes) > 1 or len(src_dtypes) > 1:
        problems.append(f"{label}: {rule.group} {new!r}: inputs have different dtypes {sorted(src_dtypes)}")
        return
    axis = rule.group_axis
    shape0 = bases[0][3]
    pieces = []
    if rule.group == "stack":
        if any(b[3] != shape0 for b in bases):
            bad = next(b for b in bases if b[3] != shape0)
            problems.append(f"{label}: stack {new!r}: {bad[0].name!r} has shape {list(bad[3])}, "
                            f"{bases[0][0].name!r} has {list(shape0)}")
            return
        if not 0 <= axis <= len(shape0):
            problems.append(f"{label}: stack axis {axis} out of range for shape {list(shape0)}")
            return
        out_shape = shape0[:axis] + (len(bases),) + shape0[axis:]
        for i, (it, view, perm, _, _) in enumerate(bases):
            ob = list(_full(out_shape))
            ob[axis] = (i, i + 1)
            pieces.append(Piece(it.src.name, view, _full(view), perm, tuple(ob)))
    else:
        if not 0 <= axis < len(shape0) or any(len(b[3]) != len(shape0) or
                                               b[3][:axis] + b[3][axis + 1:] != shape0[:axis] + shape0[axis + 1:]
                                               for b in bases):
            problems.append(f"{label}: concat {new!r}: shapes {[list(b[3]) for b in bases][:5]} do not agree "
                            f"outside axis {axis}")
            return
        total = sum(b[3][axis] for b in bases)
        out_shape = shape0[:axis] + (total,) + shape0[axis + 1:]
        start = 0
        for it, view, perm, shp, _ in bases:
            ob = list(_full(out_shape))
            ob[axis] = (start, start + shp[axis])
            pieces.append(Piece(it.src.name, view, _full(view), perm, tuple(ob)))
            start += shp[axis]
    in_dtypes = {b[0].src.name: b[0].src.dtype for b in bases}
    o = _make(new, out_shape, dtypes.pop(), pieces, in_dtypes, _ops(rule), problems)
    if o:
        outputs.append(o)
