"""What a source tensor is: a model parameter, optimizer state, an EMA average, or bookkeeping.

Decided in this order (the table in docs/mapping.md lists every convention):

1. what the source recorded: the TF2 object graph gives each variable a ``SourceRole``
   (``TensorInfo.role``: role, model name, ``ema_of``, ``slot_of``);
2. the structure of a saved tree: a flax ``TrainState``'s ``opt_state``, t5x's
   ``optimizer/state`` (its ``optimizer/target`` is the model), optax state records
   recognised by their fields anywhere (``count``/``mu``/``nu``, ``hyperparams``/
   ``inner_state``, ``MultiStepsState``, ...), EMA copies (``ema_params``, an
   ``EmaState`` outside the optimizer);
3. the naming conventions of TF1 and tf.estimator optimizers and
   ``ExponentialMovingAverage``;
4. whatever the source said: integer scalars named like training counters
   (``step``, ``global_step``, ``iterations``, ...) and variables of metrics are ``meta``.

Slots and EMAs are then linked to their weight (``slot_of``, ``ema_of``): the weight is
the param whose path is the longest unique match inside the slot's own path.
"""
from __future__ import annotations

import operator
import re
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import accumulate, repeat
from typing import Any, NamedTuple, cast

from ..core.types import Role, SourceRole, TensorInfo
from ..sources.tf_object_graph import METRIC_CONTAINERS

#: TF1 slot suffixes (tf.compat.v1.train optimizers), Keras/optax names, Mesh TF Adafactor slots.
_OPT_SLOT = re.compile(
    r"(.+)/(Adam(?:_\d+)?|Momentum|RMSProp(?:_\d+)?|Adagrad(?:DA(?:_\d+)?)?|ProximalAdagrad|Adadelta(?:_\d+)?|"
    r"Ftrl(?:_\d+)?|AdamW(?:_\d+)?|Adamax(?:_\d+)?|LazyAdam(?:_\d+)?|LAMB(?:_\d+)?|LARS|Nadam(?:_\d+)?|"
    r"adam_[mv]|accumulator|gradient_accumulator|\.OPTIMIZER_SLOT/.*)$"
    r"|(.+)_slot_(?:v|vr|vc|m)$")
_OPT_NAME = re.compile(r"^(global_step|(?:.*/)?(?:beta[12]_power|learning_rate|iterations?)|optimizer/.*)$")
_EMA = re.compile(r"^(?P<base>.+)/ExponentialMovingAverage$")

#: Keras optimizer class names (tf.keras v2, Keras 3): tf.estimator puts their state under ``training/<Name>/``.
_KERAS_OPTIMIZERS = frozenset(
    "Adadelta Adafactor Adagrad Adam AdamW Adamax Ftrl Lamb Lion Nadam RMSprop SGD LossScaleOptimizer".split())
#: Their slot names (``<optimizer>/<weight>/<slot>``) and hyperparameter variables (``<optimizer>/<name>``).
_KERAS_SLOTS = frozenset("m v vhat momentum velocity velocity_hat rms mg accumulator linear accum_grad accum_var "
                         "average_gradient accumulated_grad accumulated_delta_var norm".split())
_KERAS_HYPER = frozenset("learning_rate lr decay beta beta_1 beta_2 epsilon iter iterations momentum rho "
                         "l1_regularization_strength l2_regularization_strength learning_rate_power "
                         "l2_shrinkage_regularization_strength initial_accumulator_value weight_decay "
                         "momentum_cache".split())

#: Integer scalars with these names count training steps (TF, Keras, optax/flax TrainState, t5x).
COUNTERS = frozenset("step global_step save_counter iterations iteration iter _iterations".split())
#: Variables of metrics (under one of ``METRIC_CONTAINERS``).
_METRIC_VARS = frozenset("total count true_positives false_positives true_negatives false_negatives "
                         "accumulator confusion_matrix".split())

#: Tree fields whose subtree is optimizer state: flax TrainState, t5x ``param_states``.
_OPT_TREE_FIELDS = frozenset({"opt_state", "optimizer_state", "param_states"})
#: optax state records, by their exact set of fields (a NamedTuple is saved as a dict of its fields).
_OPTAX_STATES = tuple(frozenset(s.split()) for s in (
    "count mu nu",                                  # ScaleByAdamState (adam, adamw, yogi, novograd, ...)
    "count mu nu nu_max",                           # ScaleByAmsgradState
    "count mu",                                     # ScaleByLionState
    "count hyperparams inner_state",                # InjectHyperparamsState
    "count hyperparams hyperparams_states inner_state",  # InjectStatefulHyperparamsState
    "mini_step gradient_step inner_opt_state acc_grads",  # MultiStepsState
    "mini_step gradient_step inner_opt_state acc_grads skip_state",
    "count v_row v_col v",                          # FactoredState (adafactor)
    "e_g e_x",                                      # ScaleByAdaDeltaState
))
_EMA_STATE = frozenset({"count", "ema"})            # optax EmaState: outside an optimizer, an EMA of params
_EMA_TREE_FIELDS = frozenset({"ema_params", "params_ema"})
#: Slots whose shape is not their weight's (Adafactor's factored second moments).
_FACTORED_SLOTS = frozenset({"v_row", "v_col", "vr", "vc", "v", "m"})


class TensorRole(NamedTuple):
    """What one source tensor is to the model, under which name, and whose EMA or slot it is.
    (A NamedTuple: one is made per tensor, and a frozen dataclass costs 2-3x as much to make.)"""

    kind: Role
    name: str          # model-facing name
    ema_of: str | None = None
    slot_of: str | None = None


#: Parts that make a tree rule apply wherever they are (above the last component).
_TREE_FIELDS = _OPT_TREE_FIELDS | _EMA_TREE_FIELDS


def _children(names: Iterable[str]) -> dict[str, set[str]]:
    """Each group's child names: ``a/b/c`` puts ``a`` under ``""``, ``b`` under ``a``, ``c`` under
    ``a/b``. Each distinct group is split once (names share most of their groups); a name that
    starts with ``/`` is walked part by part, which joins its groups without the leading ``/``."""
    children: dict[str, set[str]] = defaultdict(set)
    seen: set[str] = set()
    for name in names:
        if name.startswith("/"):
            group = ""
            for part in name.split("/"):
                children[group].add(part)
                group = f"{group}/{part}" if group else part
            continue
        while name not in seen:
            seen.add(name)
            head, sep, tail = name.rpartition("/")
            children[head].add(tail)
            if not sep:
                break
            name = head
    return children


class _Tree:
    """The names of one source as a tree: which groups are optimizer state or EMA copies."""

    def __init__(self, infos: Sequence[TensorInfo], plain: bool = False) -> None:
        """``plain``: the caller knows no name has a part in ``_TREE_PARTS`` (so no group is a
        root, and no tree rule applies): the groups are not walked."""
        self.names = {t.name: t for t in infos}
        if plain:
            self.opt_roots = self.ema_roots = set()
            self.t5x, self.plain = False, True
            return
        children = _children(self.names)
        self.opt_roots = {g for g, c in children.items() if c in _OPTAX_STATES}
        self.ema_roots = {g for g, c in children.items() if c == _EMA_STATE}
        self.t5x = "target" in children.get("optimizer", ()) and "state" in children.get("optimizer", ())
        #: No tree rule can apply to a name none of whose groups is a root and none of whose parts is a tree field.
        self.plain = not (self.opt_roots or self.ema_roots or self.t5x)

    def role(self, t: TensorInfo) -> TensorRole | None:
        parts = t.name.split("/")
        if self.plain and _TREE_FIELDS.isdisjoint(parts):  # nearly every name: the loop below finds nothing
            return None
        if self.t5x and parts[0] == "optimizer" and len(parts) > 2:
            return TensorRole(Role.PARAM if parts[1] == "target" else Role.OPTIMIZER, t.name)
        if self.t5x and t.name == "version":
            return TensorRole(Role.META, t.name)
        ema: TensorRole | None = None
        group, last = "", len(parts) - 1
        for i, part in enumerate(parts):  # ``group`` holds ``part``
            if group in self.opt_roots or (i < last and part in _OPT_TREE_FIELDS):
                return TensorRole(Role.OPTIMIZER, t.name)
            if ema is None and group in self.ema_roots:
                ema = TensorRole(Role.EMA if part == "ema" else Role.META, t.name)
            elif ema is None and i < last and part in _EMA_TREE_FIELDS:
                ema = TensorRole(Role.EMA, t.name, "/".join(parts[:i] + ["params"] + parts[i + 1:]))
            group = f"{group}/{part}" if group else part
        return ema


def _keras_optimizer_state(t: TensorInfo, tree: _Tree) -> bool:
    """``[scope/]<KerasOptimizer>/<weight>/<slot>`` or ``.../<KerasOptimizer>/<hyperparameter>`` (tf.estimator)."""
    parts = t.name.split("/")
    for i, p in enumerate(parts[:-1]):
        if p in _KERAS_OPTIMIZERS:
            rest = parts[i + 1:]
            if len(rest) == 1:
                return rest[0] in _KERAS_HYPER
            weight = tree.names.get("/".join(rest[:-1]))
            return rest[-1] in _KERAS_SLOTS and weight is not None and weight.shape == t.shape
    return False


#: A substring every name the three patterns above or ``_keras_optimizer_state`` recognise contains
#: (``Ada``: Adam, Adagrad, Adadelta, Adafactor, ...): a name without one is none of theirs.
_MAYBE_OPTIMIZER = re.compile(r"ExponentialMovingAverage|Ada|Momentum|RMSProp|RMSprop|Ftrl|LAMB|LARS|Lamb|Lion|"
                              r"Nadam|adam_|accumulator|\.OPTIMIZER_SLOT/|_slot_|global_step|beta|learning_rate|"
                              r"iteration|optimizer/|SGD|LossScaleOptimizer")


def _by_name(t: TensorInfo, tree: _Tree) -> TensorRole | None:
    if _MAYBE_OPTIMIZER.search(t.name) is None:
        return None
    m = _EMA.match(t.name)
    if m:
        return TensorRole(Role.EMA, t.name, m.group("base"))
    m = _OPT_SLOT.match(t.name)
    if m:
        base = m.group(1) or m.group(3)
        return TensorRole(Role.OPTIMIZER, t.name, slot_of=base if base in tree.names else None)
    if _OPT_NAME.match(t.name) or _keras_optimizer_state(t, tree):
        return TensorRole(Role.OPTIMIZER, t.name)
    return None


def _is_counter(t: TensorInfo, name: str) -> bool:
    return not t.shape and t.dtype.startswith(("int", "uint")) and name.rsplit("/", 1)[-1] in COUNTERS


def _is_metric(name: str) -> bool:
    if name[name.rfind("/") + 1:] not in _METRIC_VARS:
        return False
    parts = name.split("/")
    return parts[-1] in _METRIC_VARS and any(p in METRIC_CONTAINERS for p in parts[:-1])


def _recorded(t: TensorInfo) -> SourceRole | None:
    """The role the source recorded for ``t``, if any."""
    return t.role


#: ``_recorded`` and ``TensorRole.kind`` for ``map``: C-level getters, for 100 000 tensors.
_role_of_info = operator.attrgetter("role")
_KIND = operator.itemgetter(0)


#: Role members as module constants: ``Role.PARAM`` is a class attribute lookup, run per tensor below.
_PARAM, _OPTIMIZER, _EMA_ROLE, _META = Role.PARAM, Role.OPTIMIZER, Role.EMA, Role.META
#: Kinds whose role may lack its weight (``_link``).
_UNLINKED = frozenset({_OPTIMIZER, _EMA_ROLE})


def _decide(t: TensorInfo, rec: SourceRole | None, tree: _Tree | None) -> TensorRole:
    """``t``'s role: as recorded, else from the tree and names (``tree`` is given when any
    tensor lacks a recorded role); counters and metric variables are ``meta``."""
    if rec is not None:
        role = TensorRole(rec.role, rec.model_name or t.name, rec.ema_of, rec.slot_of)
    elif tree is None:
        role = TensorRole(_PARAM, t.name)
    else:
        role = tree.role(t) or _by_name(t, tree) or TensorRole(_PARAM, t.name)
    kind = role.kind
    if (kind == _PARAM or kind == _OPTIMIZER) and _is_counter(t, role.name):
        return role._replace(kind=_META)
    if kind == _PARAM and _is_metric(role.name):
        return role._replace(kind=_META)
    return role


class _Weights:
    """Params indexed by every tail of their path, to find the weight a slot or EMA belongs to."""

    def __init__(self, params: Iterable[tuple[TensorRole, TensorInfo]]) -> None:
        self.tails: dict[tuple[str, ...], list[tuple[TensorRole, TensorInfo]]] = defaultdict(list)
        self.flat: dict[str, tuple[TensorRole, TensorInfo]] = {}
        for role, t in params:
            parts = tuple(role.name.split("/"))
            for i in range(len(parts)):
                self.tails[parts[i:]].append((role, t))
            self.flat[role.name.replace("/", "_")] = (role, t)

    def owner(self, name: str, t: TensorInfo) -> str | None:
        """The longest run of ``name``'s components that is the tail of exactly one param of the
        same shape, ending at the last component or just before it (``<weight>/<slot>``; a factored
        slot such as Adafactor's ``v_row`` may differ in shape)."""
        parts = name.split("/")
        n = len(parts)
        for length in range(n, 0, -1):
            for end in (n, n - 1):
                hits = self.tails.get(tuple(parts[end - length:end])) if end - length >= 0 else None
                if hits and len(hits) == 1 and (hits[0][1].shape == t.shape
                                                or end < n and parts[-1] in _FACTORED_SLOTS):
                    return hits[0][0].name
        return self._keras3_owner(parts[-1], t)

    def _keras3_owner(self, leaf: str, t: TensorInfo) -> str | None:
        """Keras 3 names a slot ``<weight path with _>_<slot>`` (``dense_kernel_momentum``), same shape."""
        cut = leaf.rfind("_")
        while cut > 0:
            hit = self.flat.get(leaf[:cut])
            if hit is not None and hit[1].shape == t.shape:
                return hit[0].name
            cut = leaf.rfind("_", 0, cut)
        return None


#: Inside ``remembering()``: the last call's infos and roles (None outside: nothing is held).
_last: tuple[tuple[TensorInfo, ...], list[TensorRole]] | None = None


@contextmanager
def remembering() -> Iterator[None]:
    """Within this, ``assign_roles`` remembers its last answer: ``plan`` asks twice for the same
    list (the planner, then the sizes it shows), and roles depend only on the (frozen) infos, so
    the same objects give the same roles. Outside it nothing is kept (a conversion holds no copy)."""
    global _last
    before, _last = _last, ((), [])
    try:
        yield
    finally:
        _last = before


def assign_roles(infos: Sequence[TensorInfo]) -> list[TensorRole]:
    """The role of each of ``infos`` (one source's tensors), in order, with slots and EMAs linked."""
    global _last
    if _last is None:
        return _assign(infos)
    seen, roles = _last
    if infos and len(seen) == len(infos) and all(map(operator.is_, seen, infos)):
        return list(roles)
    roles = _assign(infos)
    _last = (tuple(infos), roles)
    return list(roles)


#: Every name part a tree rule looks at: the fields of the optax state records and EMA states,
#: t5x's ``optimizer``, and the tree fields. A source none of whose names has one has no tree roots.
_TREE_PARTS = frozenset().union(*_OPTAX_STATES, _EMA_STATE, _TREE_FIELDS, {"optimizer"})
#: Last parts of counters and metric variables (``_is_counter``, ``_is_metric``).
_META_PARTS = COUNTERS | _METRIC_VARS
_MAYBE_META = r"(?:^|/)(?:" + "|".join(map(re.escape, sorted(_META_PARTS))) + ")$"
#: ``_MAYBE_OPTIMIZER`` or ``_MAYBE_META`` in a name (one name a line, ``re.M``).
_MAYBE_NOT_PARAM = re.compile(f"{_MAYBE_OPTIMIZER.pattern}|{_MAYBE_META}", re.M)
_MAYBE_META_ONLY = re.compile(_MAYBE_META, re.M)
#: ``_MAYBE_OPTIMIZER`` within one part of a name: its words that hold a ``/`` cut there (a
#: name it matches has a part this matches).
_MAYBE_OPTIMIZER_PART = re.compile(_MAYBE_OPTIMIZER.pattern.replace("/", ""))


def _flagged(names: list[str], pattern: re.Pattern[str]) -> set[int] | None:
    """The indexes of ``names`` in which ``pattern`` finds a match, by one search of them joined
    by newlines (``^``/``$`` match at each name's ends; no pattern here matches a newline, so
    none spans two names), or None where a name holds a newline."""
    text = "\n".join(names)
    if text.count("\n") != len(names) - 1:
        return None
    hits = [m.start() for m in pattern.finditer(text)]
    if not hits:
        return set()
    starts = list(accumulate(map((1).__add__, map(len, names)), initial=0))
    return {bisect_right(starts, begin) - 1 for begin in hits}


#: ``SourceRole``'s fields, by index (a NamedTuple): role, model name, ``ema_of``, ``slot_of``.
_SOURCE_KIND, _MODEL_NAME, _EMA_OF, _SLOT_OF = cast(list[Callable[[Any], Any]], list(map(operator.itemgetter, range(4))))


def _assign_fast(infos: Sequence[TensorInfo], recorded: list[SourceRole | None]) -> list[TensorRole] | None:
    """``_assign``'s roles where every tensor has a recorded role or none has, decided in bulk: one
    search of all names finds those some rule might apply to, and each of those (usually none) is
    decided by ``_decide``; the others are params, or keep their recorded role. None where the
    bulk search cannot decide (a tree rule may apply, a mix of recorded roles, names with newlines)."""
    if not infos:
        return []
    if recorded[0] is None:
        if any(recorded):
            return None
        names = [t.name for t in infos]
        parts = set("/".join(names).split("/"))
        if not _TREE_PARTS.isdisjoint(parts):
            return None
        flagged: set[int] | None = set()
        if not _META_PARTS.isdisjoint(parts) or _MAYBE_OPTIMIZER_PART.search("\n".join(parts)) is not None:
            flagged = _flagged(names, _MAYBE_NOT_PARAM)
        if flagged is None:
            return None
        roles = list(map(tuple.__new__, repeat(TensorRole), zip(repeat(_PARAM), names, repeat(None), repeat(None))))
        tree = _Tree(infos, plain=True) if flagged else None
        for i in flagged:
            roles[i] = _decide(infos[i], None, tree)
        return roles
    if not all(recorded):
        return None
    names = list(map(_MODEL_NAME, recorded))  # (SourceRole's fields by index: C-level, no loop here)
    if None in names or "" in names:
        names = [rec.model_name or t.name for t, rec in zip(infos, recorded)]  # type: ignore[union-attr]
    flagged = set()
    if not _META_PARTS.isdisjoint("/".join(names).split("/")):
        flagged = _flagged(names, _MAYBE_META_ONLY)
    if flagged is None:
        return None
    roles = list(map(tuple.__new__, repeat(TensorRole), zip(map(_SOURCE_KIND, recorded), names, map(_EMA_OF, recorded),
                                                             map(_SLOT_OF, recorded))))
    for i in flagged:
        roles[i] = _decide(infos[i], recorded[i], None)
    return roles


def _assign(infos: Sequence[TensorInfo]) -> list[TensorRole]:
    """``assign_roles`` without the memory of the last call."""
    recorded: list[SourceRole | None] = list(map(_role_of_info, infos))
    roles = _assign_fast(infos, recorded)
    if roles is None:
        roles = _assign_each(infos, recorded)
    if not _UNLINKED.isdisjoint(map(_KIND, roles)):
        _link(infos, roles)
    return roles


def _assign_each(infos: Sequence[TensorInfo], recorded: list[SourceRole | None]) -> list[TensorRole]:
    """Each tensor's role decided by ``_decide`` alone (what ``_assign_fast`` must agree with)."""
    # The tree and the weight index cost more than the rest; build each only if a tensor needs it.
    tree = _Tree(infos) if any(r is None for r in recorded) else None
    return [_decide(t, rec, tree) for t, rec in zip(infos, recorded)]


def _link(infos: Sequence[TensorInfo], roles: list[TensorRole]) -> None:
    """Slots and EMAs without a recorded weight get one (``_Weights.owner``); an EMA with none
    is a param."""
    weights: _Weights | None = None
    for i, (r, t) in enumerate(zip(roles, infos)):
        if (r.kind == _OPTIMIZER and r.slot_of is None) or (r.kind == _EMA_ROLE and r.ema_of is None):
            if weights is None:
                weights = _Weights((r, t) for r, t in zip(roles, infos) if r.kind == Role.PARAM and not t.is_string)
            owner = weights.owner(r.name, t)
            if r.kind == Role.OPTIMIZER:
                roles[i] = r._replace(slot_of=owner)
            else:
                roles[i] = r._replace(ema_of=owner) if owner else r._replace(kind=Role.PARAM)


def role_of(t: TensorInfo) -> TensorRole:
    """The role of one tensor seen alone (no tree structure, no links); prefer ``assign_roles``."""
    return assign_roles([t])[0]
