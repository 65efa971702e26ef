"""Build a Plan from a source: names and roles, EMA/optimizer switches, then rules.

Reads no values. Every problem (unmapped names, collisions, impossible shapes)
is collected and reported together in one PlanError.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..core.plan import Copy, OutputTensor, Plan, check_name
from ..core.types import TensorInfo
from ..errors import PlanError
from ..frontend import option
from ..sources.base import Source
from ..util.dtypes import numpy_dtype
from .assemble import Assemble, Piece, check_piece
from .roles import Role, assign_roles
from .rules import Rule, parse_rules
from .select import check_options, select

DEFAULTS = {"prefer_ema": False, "drop_optimizer": False, "allow_unmapped": False, "names": "model"}


@dataclass
class _Item:
    name: str
    src: TensorInfo
    role: Role
    notes: list[str] = field(default_factory=list)
    cast: str | None = None  # the global dtype option, for a floating-point tensor no rule casts


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


def build_plan(source: Source, rules: list[dict[str, Any]] | None = None, *, options: dict[str, Any] | None = None,
               origins: dict[str, str] | None = None, **overrides: Any) -> Plan:
    """The plan for ``source`` under ``rules``; ``overrides`` (prefer_ema, drop_optimizer,
    allow_unmapped, names, ...) take precedence over options given with the rules. ``origins``
    says where those came from (``preset keras-ema``), for messages; an override is named as
    the user gave it (``--drop-optimizer`` or ``drop_optimizer=True``)."""
    ruleset = parse_rules(rules, options)
    opts = {**DEFAULTS, **ruleset.options, **{k: v for k, v in overrides.items() if v is not None}}
    origins = {**(origins or {}), **{k: option(k, v) for k, v in overrides.items() if v is not None}}
    by = {k: origins.get(k, option(k)) for k in ("prefer_ema", "drop_optimizer")}
    if opts["names"] not in ("model", "keys"):
        raise PlanError([f"names must be 'model' or 'keys', got {opts['names']!r}"])
    bad = check_options(opts)
    if bad:
        raise PlanError(bad)
    problems: list[str] = []
    dropped: list[tuple[str, str]] = []
    notes: list[str] = []
    loc = source.location

    items: list[_Item] = []
    infos = list(source.tensors())
    for t, role in zip(infos, assign_roles(infos)):
        if t.is_string:
            dropped.append((role.name if opts["names"] == "model" else t.name,
                            "string tensor (array outputs hold numbers only)"))
            continue
        items.append(_Item(role.name if opts["names"] == "model" else t.name, t, role))

    # -- EMA and optimizer state
    emas = [it for it in items if it.role.kind == "ema"]
    if opts["prefer_ema"]:
        if not emas:
            problems.append(f"{loc}: {by['prefer_ema']}, but the checkpoint holds no EMA values (looked for Keras "
                            "use_ema averages, .../ExponentialMovingAverage shadows, flax ema_params and "
                            "optax EmaState trees; see docs/mapping.md)")
        params = {it.role.name: it for it in items if it.role.kind == "param"}
        seen: dict[str, _Item] = {}
        for e in emas:
            target = e.role.ema_of
            if target in seen:
                problems.append(f"{loc}: two EMA values for {target!r}: {seen[target].src.name} and {e.src.name}")
                continue
            seen[target] = e
            p = params.get(target)
            if p is None:
                # Only the average was saved: it is the model's value.
                e.role = Role("param", target)
                e.name = target if opts["names"] == "model" else e.src.name
                e.notes.append(f"EMA {e.src.name} (its raw weight is not in the checkpoint)")
                continue
            if (p.src.dtype, p.src.shape) != (e.src.dtype, e.src.shape):
                problems.append(f"{loc}: EMA {e.src.name} is {e.src.dtype}{list(e.src.shape)} but {target} is "
                                f"{p.src.dtype}{list(p.src.shape)}")
                continue
            dropped.append((p.name, f"raw weight; its EMA is written under the model name ({by['prefer_ema']})"))
            p.notes.append(f"EMA value from {e.src.name}")
            p.src = e.src
            e.role = Role("consumed", e.role.name)
        items = [it for it in items if it.role.kind != "consumed"]
        raw = [it.name for it in items if it.role.kind == "param" and not it.notes]
        if raw:
            notes.append(f"{by['prefer_ema']}: {len(raw)} parameter(s) have no EMA and keep their raw value "
                         f"(e.g. {', '.join(raw[:3])})")
    elif emas:
        shown = ", ".join(sorted({e.role.ema_of or e.name for e in emas})[:3])
        notes.append(f"the checkpoint holds EMA averages of {len(emas)} weight(s) (e.g. {shown}); "
                     f"{option('prefer_ema')} writes them under the weights' names")
    if opts["drop_optimizer"]:
        items = _drop_optimizer(items, dropped, notes, by["drop_optimizer"])
    items = select(items, opts, dropped)

    # -- rules
    outputs: list[OutputTensor] = []
    groups: dict[tuple[int, str], list[tuple[Any, _Item]]] = defaultdict(list)
    for it in items:
        hit = ruleset.first_match(it.name) if ruleset.rules else None
        if hit is None:
            if ruleset.rules and not opts["allow_unmapped"]:
                problems.append(f"no rule maps {it.name!r}" + (f" (source {it.src.name})" if it.src.name != it.name else ""))
                continue
            _single(it, it.name, None, outputs, problems)
            continue
        rule, m = hit
        if rule.drop:
            dropped.append((it.name, f"dropped by {rule.label}"))
            continue
        new = _expand(m, rule.rename) if rule.rename is not None else it.name
        if rule.group:
            try:
                idx = int(m.expand(rule.group_index))
            except (ValueError, IndexError, re.error):
                problems.append(f"{rule.label}: index {rule.group_index!r} of {it.name!r} is not an integer")
                continue
            groups[(rule.index, new)].append((idx, it, rule))
        else:
            _single(it, new, rule, outputs, problems)
    for (_, new), members in groups.items():
        _group(new, members, outputs, problems)

    # -- collisions and names
    by_name: dict[str, list[OutputTensor]] = defaultdict(list)
    for o in outputs:
        by_name[o.name].append(o)
    for name, outs in by_name.items():
        if len(outs) > 1:
            srcs = sorted({s for o in outs for s in o.producer.inputs})
            problems.append(f"{len(outs)} tensors map to the output name {name!r}: {', '.join(srcs[:6])}")
        why = check_name(name)
        if why:
            srcs = sorted({s for o in outs for s in o.producer.inputs})
            problems.append(f"output name {name!r} (from {', '.join(srcs[:3])}) is unsafe ({why})")
    if problems:
        raise PlanError([p.removeprefix(f"{loc}: ") for p in problems], where=loc)
    plan_options = {**opts, "rules": [r.raw for r in ruleset.rules]}
    if not source.stores_checksums and source.input_files():
        notes.append(f"{source.format} input stores no checksums: a change to it during the run is detected "
                     "only from file metadata (size, times, inode)")
    plan = Plan(source, outputs, dropped, plan_options)
    plan.notes = notes
    return plan


_DROP_REASONS = {
    "optimizer": "optimizer state ({by})",
    "meta": "training counter, metric or checkpoint bookkeeping ({by})",
    "ema": "EMA copy ({by}; add {prefer_ema} to write it instead of the raw weight)",
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
