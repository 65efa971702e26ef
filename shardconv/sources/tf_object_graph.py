"""The TF2 object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``), decoded without TensorFlow.

A TF2 checkpoint names each value by one shortest path through the graph of
trackable objects; a model's weight may appear only under the optimizer
(``optimizer/_trainable_variables/N``) or an EMA object. Decoding the graph gives
every path to each variable, its ``full_name`` (Keras's readable variable path),
and which slot variables belong to which variable, so names and roles can be
assigned by what a value *is*, not by the accident of its key.
"""
from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass, field

from ..core.types import Role, SourceRole
from ..errors import FormatError
from ..formats.wire import fields, read_varint

ATTRIBUTES = "/.ATTRIBUTES/"


@dataclass(slots=True)
class Node:
    id: int
    children: list[tuple[str, int]] = field(default_factory=list)      # (local name, node id)
    attributes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, full_name, checkpoint_key)
    slots: list[tuple[int, str, int]] = field(default_factory=list)      # (variable node, slot name, slot node)


def _text(v: memoryview) -> str:
    return bytes(v).decode("utf-8", errors="replace")


def parse(blob: bytes, where: str) -> list[Node]:
    """Nodes of a serialized ``TrackableObjectGraph`` (node 0 is the root).

    ``_fast_nodes`` decodes the graph; where it meets anything malformed it gives up and
    ``parse_strict`` decodes it again, so results and errors are those of ``parse_strict``."""
    try:
        nodes = _fast_nodes(bytes(blob))
    except _Bail:
        return parse_strict(blob, where)
    return _checked(nodes, f"{where}: object graph")


def parse_strict(blob: bytes, where: str) -> list[Node]:
    """``parse``, field by field with ``wire.fields`` (which raises every decoding error): the
    reference the fast decoder is tested against."""
    what = f"{where}: object graph"
    return _checked(_strict_nodes(blob, what), what)


def _checked(nodes: list[Node], what: str) -> list[Node]:
    """``nodes``, once every child and slot reference is checked to name a node."""
    for node in nodes:
        for local, ref in node.children:
            if not 0 <= ref < len(nodes):
                raise FormatError(f"{what}: node {node.id} child {local!r} points at node {ref} of {len(nodes)}")
        for orig, _, slot in node.slots:
            if not (0 <= orig < len(nodes) and 0 <= slot < len(nodes)):
                raise FormatError(f"{what}: node {node.id} has a slot variable reference outside the graph")
    return nodes


def _strict_nodes(blob: bytes, what: str) -> list[Node]:
    """The nodes, decoded field by field by ``wire.fields`` (which raises every error)."""
    nodes: list[Node] = []
    for num, wt, val in fields(blob, what):
        if num != 1 or wt != 2:
            continue
        node = Node(len(nodes))
        for n2, w2, v2 in fields(val, what):
            if n2 == 1 and w2 == 2:
                node.children.append(_strict_child(v2, what))
            elif n2 == 2 and w2 == 2:
                node.attributes.append(_strict_attribute(v2, what))
            elif n2 == 3 and w2 == 2:
                node.slots.append(_strict_slot(v2, what))
        nodes.append(node)
    return nodes


def _strict_child(buf: memoryview, what: str) -> tuple[str, int]:
    ref_id, local = 0, ""
    for num, wt, val in fields(buf, what):
        if num == 1 and wt == 0:
            ref_id = val
        elif num == 2 and wt == 2:
            local = _text(val)
    return local, ref_id


def _strict_attribute(buf: memoryview, what: str) -> tuple[str, str, str]:
    name = full = key = ""
    for num, wt, val in fields(buf, what):
        if wt != 2:
            continue
        if num == 1:
            name = _text(val)
        elif num == 2:
            full = _text(val)
        elif num == 3:
            key = _text(val)
    return name, full, key


def _strict_slot(buf: memoryview, what: str) -> tuple[int, str, int]:
    orig = slot_node = 0
    slot_name = ""
    for num, wt, val in fields(buf, what):
        if num == 1 and wt == 0:
            orig = val
        elif num == 2 and wt == 2:
            slot_name = _text(val)
        elif num == 3 and wt == 0:
            slot_node = val
    return orig, slot_name, slot_node


# ------------------------------------------------------------ the fast decoder
#
# The same decoding as ``_strict_nodes`` in plain loops over ``bytes`` (no generator, no
# memoryview, one-byte varints and keys read inline). Every condition under which
# ``wire.fields`` raises (a truncated or over-long varint, a value past the end of its
# message, field number 0, wire types 3, 4, 6, 7) raises ``_Bail`` instead.


class _Bail(Exception):
    """The fast decoder met something malformed; the strict one decides what to say."""


def _varint(buf: bytes, pos: int, stop: int) -> tuple[int, int]:
    """The varint at ``pos`` inside [pos, stop) and the position after it, as ``wire.read_varint``."""
    if pos < stop and buf[pos] < 0x80:
        return buf[pos], pos + 1
    if pos + 1 < stop and buf[pos + 1] < 0x80:  # two bytes: node ids up to 16383, lengths up to 16 KiB
        return (buf[pos] & 0x7F) | buf[pos + 1] << 7, pos + 2
    try:
        return read_varint(buf, pos, stop)
    except FormatError:
        raise _Bail from None


def _key(buf: bytes, pos: int, stop: int) -> tuple[int, int, int]:
    """Field number, wire type and the position after a field key."""
    key = buf[pos]
    if key < 0x80:
        pos += 1
    else:
        key, pos = _varint(buf, pos, stop)
    if key < 8:
        raise _Bail
    return key >> 3, key & 7, pos


def _value(buf: bytes, pos: int, stop: int, wt: int) -> tuple[int, int]:
    """A field's value (a varint or fixed one; for wire type 2, the length) and where it ends
    (for wire type 2, where the bytes start: they end at ``pos + value``)."""
    if wt == 0 or wt == 2:
        val, pos = _varint(buf, pos, stop)
        if wt == 2 and val > stop - pos:
            raise _Bail
        return val, pos
    size = 8 if wt == 1 else 4 if wt == 5 else 0
    if not size or pos + size > stop:
        raise _Bail
    return int.from_bytes(buf[pos:pos + size], "little"), pos + size


def _fast_nodes(blob: bytes) -> list[Node]:
    nodes: list[Node] = []
    pos, stop = 0, len(blob)
    try:
        while pos < stop:
            if blob[pos] == 0x0A:  # field 1 (a node), length-delimited: nearly every field
                val, pos = _varint(blob, pos + 1, stop)
                if val > stop - pos:
                    raise _Bail
                nodes.append(_fast_node(blob, pos, pos + val, len(nodes)))
            else:
                num, wt, pos = _key(blob, pos, stop)
                val, pos = _value(blob, pos, stop, wt)
                if wt != 2:
                    continue
            pos += val
    except IndexError:  # a key as the blob's last byte: wire.fields says it is truncated
        raise _Bail from None
    return nodes


def _fast_node(buf: bytes, pos: int, stop: int, nid: int) -> Node:
    children: list[tuple[str, int]] = []
    attributes: list[tuple[str, str, str]] = []
    slots: list[tuple[int, str, int]] = []
    while pos < stop:
        key, n = buf[pos], buf[pos + 1]
        if 8 <= key < 0x80 and key & 7 == 2 and n < 0x80:  # a one-byte key (not field 0) and length
            pos += 2
        else:
            num, wt, pos = _key(buf, pos, stop)
            n, pos = _value(buf, pos, stop, wt)
            if wt != 2:
                continue
            key = num << 3 | 2
        end = pos + n
        if end > stop:
            raise _Bail
        if key == 0x0A:
            children.append(_fast_child(buf, pos, end))
        elif key == 0x12:
            attributes.append(_fast_attribute(buf, pos, end))
        elif key == 0x1A:
            slots.append(_fast_slot(buf, pos, end))
        pos = end
    return Node(nid, children, attributes, slots)


def _fast_child(buf: bytes, pos: int, stop: int) -> tuple[str, int]:
    if stop - pos >= 4 and buf[pos] == 0x08:  # TensorFlow's form: node_id, then local_name
        if buf[pos + 1] < 0x80:
            ref_id, p = buf[pos + 1], pos + 2
        else:
            ref_id, p = _varint(buf, pos + 1, stop)
        if p + 2 <= stop and buf[p] == 0x12 and buf[p + 1] < 0x80 and p + 2 + buf[p + 1] == stop:
            return buf[p + 2:stop].decode("utf-8", "replace"), ref_id
    ref_id, local = 0, ""
    while pos < stop:
        num, wt, pos = _key(buf, pos, stop)
        val, pos = _value(buf, pos, stop, wt)
        if wt == 2:
            if num == 2:
                local = buf[pos:pos + val].decode("utf-8", "replace")
            pos += val
        elif num == 1 and wt == 0:
            ref_id = val
    return local, ref_id


def _fast_attribute(buf: bytes, pos: int, stop: int) -> tuple[str, str, str]:
    if pos + 2 <= stop and buf[pos] == 0x0A and buf[pos + 1] < 0x80:  # TF's form: name, full_name, checkpoint_key
        a = pos + 2
        b = a + buf[pos + 1]
        if b + 2 <= stop and buf[b] == 0x12 and buf[b + 1] < 0x80:
            c = b + 2 + buf[b + 1]
            if c + 2 <= stop and buf[c] == 0x1A and buf[c + 1] < 0x80 and c + 2 + buf[c + 1] == stop:
                return (buf[a:b].decode("utf-8", "replace"), buf[b + 2:c].decode("utf-8", "replace"),
                        buf[c + 2:stop].decode("utf-8", "replace"))
    texts = ["", "", "", ""]
    while pos < stop:
        key, n = buf[pos], buf[pos + 1]
        if key in (0x0A, 0x12, 0x1A) and n < 0x80:  # name, full_name, checkpoint_key; a one-byte length
            pos += 2
            if n > stop - pos:
                raise _Bail
            texts[key >> 3] = buf[pos:pos + n].decode("utf-8", "replace")
            pos += n
            continue
        num, wt, pos = _key(buf, pos, stop)
        val, pos = _value(buf, pos, stop, wt)
        if wt == 2:
            if num <= 3:
                texts[num] = buf[pos:pos + val].decode("utf-8", "replace")
            pos += val
    return texts[1], texts[2], texts[3]


def _fast_slot(buf: bytes, pos: int, stop: int) -> tuple[int, str, int]:
    orig = slot_node = 0
    slot_name = ""
    while pos < stop:
        num, wt, pos = _key(buf, pos, stop)
        val, pos = _value(buf, pos, stop, wt)
        if wt == 2:
            if num == 2:
                slot_name = buf[pos:pos + val].decode("utf-8", "replace")
            pos += val
        elif wt == 0:
            if num == 1:
                orig = val
            elif num == 3:
                slot_node = val
    return orig, slot_name, slot_node


def all_paths(nodes: list[Node], limit: int = 16) -> dict[int, list[str]]:
    """Every node's paths from the root, shortest first (at most ``limit`` each)."""
    paths: dict[int, list[str]] = {0: [""]} if nodes else {}
    queue = deque([(0, "")]) if nodes else deque()
    while queue:
        nid, path = queue.popleft()
        prefix = f"{path}/" if path else ""
        for local, child in nodes[nid].children:
            p = prefix + local
            known = paths.get(child)
            if known is None:  # the first path to ``child``: nearly every edge
                paths[child] = [p]
            elif len(known) >= limit or any(not k or p.startswith(k + "/") for k in known):  # no cycles
                continue
            else:
                known.append(p)
            queue.append((child, p))
    return paths


#: Attributes holding metric objects (Keras 2 ``keras_api/metrics``, compiled metrics): their variables are ``meta``.
METRIC_CONTAINERS = frozenset({"metrics", "_metrics", "compiled_metrics", "_compile_metrics", "metrics_variables"})

#: Keras 3 optimizer lists whose K-th entry belongs to ``_trainable_variables/K``.
_KERAS_EMA_LIST = "_model_variables_moving_average"
_KERAS_TRAINABLE_LIST = "_trainable_variables"
#: Children of a Keras optimizer that are not lists of per-weight slots.
_NOT_SLOT_LISTS = frozenset({"_variables", _KERAS_TRAINABLE_LIST, "_trainable_variables_indices", _KERAS_EMA_LIST,
                             "_index_dict"})
#: Children only Keras 3 objects have (a Sequential's ``_functional``, an export archive's ``_all_variables``).
_KERAS3_MARKS = frozenset({"_functional", "_operations", _KERAS_TRAINABLE_LIST, "_all_variables"})
#: An export archive (``model.export``) keeps a second copy of each variable its endpoints use here.
_EXPORT_COPIES = "_all_variables"
_DIGITS = re.compile(r"(\d+)")
#: A slot is ``optimizer/<weight>/<slot>``: named after its weight, but not inside it, so that outputs
#: that nest names (Zarr, SavedModel modules) never see a weight that is also a group.
SLOT_ROOT = "optimizer"


def _strip_key(key: str) -> str:
    i = key.find(ATTRIBUTES)
    return key[:i] if i >= 0 else key


def natural_key(key: str) -> list:
    """Sort key comparing the numbers in ``key`` as numbers (``_variables/2`` before ``_variables/10``):
    the text between numbers at even positions, the numbers at odd ones."""
    parts: list = _DIGITS.split(key)
    parts[1::2] = map(int, parts[1::2])
    return parts


def strip_model_scope(names: list[str]) -> list[str]:
    """Keras 3 builds a Sequential's layers inside the model's name scope (``sequential/dense/kernel``),
    Keras 2 does not (``dense/kernel``): a first component that all ``names`` share is dropped when
    every name keeps at least two components."""
    if names and len({n.split("/", 1)[0] for n in names}) == 1 and all(n.count("/") >= 2 for n in names):
        return [n.split("/", 1)[1] for n in names]
    return names


def dedupe(names: list[str]) -> list[str]:
    """Names made unique, in order: the K-th repeat of ``a/b/kernel`` becomes ``a/b_K/kernel`` (the
    layer's name suffixed as Keras suffixes layer names; a one-component name gets ``_K``), K raised
    until the name is free."""
    taken, out = set(names), []
    seen: Counter[str] = Counter()
    for n in names:
        k = seen[n]
        seen[n] += 1
        head, sep, last = n.rpartition("/")
        while k:
            cand = f"{head}_{k}{sep}{last}" if head else f"{n}_{k}"
            if cand not in taken:
                taken.add(cand)
                n = cand
                break
            k += 1
        out.append(n)
    return out


class _Graph:
    """Which nodes are variables, optimizers, and by which paths they are reached."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.paths = all_paths(nodes)
        locals_ = {local for node in nodes for local, _ in node.children}
        self.keras3 = not locals_.isdisjoint(_KERAS3_MARKS)
        self.metrics = not locals_.isdisjoint(METRIC_CONTAINERS)  # does any path pass through a metric?
        marks = (_KERAS_TRAINABLE_LIST, "_iterations")
        scan = not locals_.isdisjoint(marks)  # else only slot references make an optimizer
        self.optimizers = {nid for nid, node in enumerate(nodes) if node.slots or scan and any(
            local in marks for local, _ in node.children)}
        self.opt_paths = {p for nid in self.optimizers for p in self.paths.get(nid, [])}
        self.keys: dict[int, tuple[str, str]] = {}   # variable node -> (checkpoint key, full_name)
        for node in nodes:
            for name, full, key in node.attributes:
                if name == "VARIABLE_VALUE" and key:
                    self.keys[node.id] = (key, full)
        self.copies: set[int] = set()
        if nodes and any(local == _EXPORT_COPIES for local, _ in nodes[0].children):
            outside = {full for nid, (_, full) in self.keys.items() if not self.only_under(nid, _EXPORT_COPIES)}
            self.copies = {nid for nid, (_, full) in self.keys.items()
                           if full and full in outside and self.only_under(nid, _EXPORT_COPIES)}

    def in_key_order(self, nids: list[int]) -> list[int]:
        """``nids`` (variable nodes) in the natural order of their checkpoint keys, ties kept in order."""
        return sorted(nids, key=lambda nid: natural_key(self.keys[nid][0]))

    def only_under(self, nid: int, top: str) -> bool:
        """Every path to ``nid`` starts with the root's child ``top``."""
        ps = self.paths.get(nid)
        below = top + "/"
        return ps is not None and bool(ps) and all(p == top or p.startswith(below) for p in ps)

    def under_optimizer(self, p: str) -> bool:
        return bool(self.opt_paths) and any(p == o or p.startswith(o + "/") for o in self.opt_paths)

    def model_path(self, nid: int) -> str:
        ps = self.paths.get(nid, [])
        outside = [p for p in ps if not self.under_optimizer(p)]
        return (outside or ps or [""])[0]

    def lists(self, nid: int) -> dict[str, dict[str, int]]:
        """An optimizer's list children: name -> {index: node}."""
        return {local: dict(self.nodes[child].children) for local, child in self.nodes[nid].children}

    def links(self) -> tuple[dict[int, int], set[int]]:
        """EMA averages -> their weight, and the weights a Keras 3 optimizer trains."""
        ema_of: dict[int, int] = {}
        trainable: set[int] = set()
        for nid in self.optimizers:
            lists = self.lists(nid)
            params = lists.get(_KERAS_TRAINABLE_LIST, {})
            trainable.update(params.values())
            for k, avg in lists.get(_KERAS_EMA_LIST, {}).items():
                if k in params:
                    ema_of[avg] = params[k]
        return ema_of, trainable

    def role(self, nid: int, ema_of: dict[int, int], trainable: set[int], slots: dict[int, tuple[int, str]]) -> Role:
        ps = self.paths.get(nid)
        if nid in ema_of:
            return Role.EMA
        if nid in slots:
            return Role.OPTIMIZER
        if nid in trainable:
            return Role.PARAM
        if nid in self.copies:
            return Role.META
        if ps and self.opt_paths and all(self.under_optimizer(p) for p in ps):
            return Role.OPTIMIZER
        if ps == ["save_counter"] or ps and self.metrics and all(METRIC_CONTAINERS.intersection(p.split("/"))
                                                                 for p in ps):
            return Role.META
        return Role.PARAM


def _param_names(g: _Graph, params: list[int]) -> dict[int, str]:
    """Each param's name: its ``full_name`` (the variable's Keras/TF name) where that has a scope,
    else its object path outside the optimizer; a Keras 3 model's own name scope dropped
    (``strip_model_scope``); repeats made unique by ``dedupe`` in the order of their keys.

    ``params`` come in ``g.keys`` order; they are sorted (``natural_key`` costs microseconds a
    key) only where two names collide, the only case where their order changes a name."""
    named = [nid for nid in params if "/" in g.keys[nid][1]]
    fulls = [g.keys[nid][1] for nid in named]
    if g.keras3:
        fulls = strip_model_scope(fulls)
    base = dict(zip(named, fulls))
    names = [base.get(nid) or g.model_path(nid) or _strip_key(g.keys[nid][0]) for nid in params]
    if len(set(names)) == len(names):
        return dict(zip(params, names))  # what ``dedupe`` leaves unchanged in any order
    given = dict(zip(params, names))
    params = g.in_key_order(params)
    return dict(zip(params, dedupe([given[nid] for nid in params])))


def _slot_name(leaf: str, weight_full: str, fallback: str) -> str:
    """Keras 3 calls a slot ``<weight path joined by _>_<slot>``: the ``<slot>`` part, else ``fallback``."""
    flat = weight_full.replace("/", "_") + "_"
    return leaf[len(flat):] if weight_full and leaf.startswith(flat) and len(leaf) > len(flat) else fallback


def _slots(g: _Graph, params: list[int]) -> dict[int, tuple[int, str]]:
    """Slot variable -> (its weight, the slot's name): TF's slot references (Keras 2 legacy optimizers),
    a Keras 3 optimizer's per-weight lists (entry K belongs to ``_trainable_variables/K``), and a
    Keras 2 optimizer's variables named ``<Optimizer>/<slot>/<weight's full name>``."""
    out: dict[int, tuple[int, str]] = {}
    by_full: dict[str, list[int]] = {}
    for nid in params if g.optimizers else ():  # in g.keys order; a full name several params share: in key order
        by_full.setdefault(g.keys[nid][1], []).append(nid)
    for full, same in by_full.items():
        if len(same) > 1:
            by_full[full] = g.in_key_order(same)
    for opt in sorted(g.optimizers):
        for orig, slot_name, slot_node in g.nodes[opt].slots:
            out[slot_node] = (orig, slot_name)
        lists = g.lists(opt)
        weights = lists.get(_KERAS_TRAINABLE_LIST)
        used: Counter = Counter()
        for local, entries in sorted(lists.items()):
            if local in _NOT_SLOT_LISTS or not all(k.isdigit() for k in entries):
                continue
            for k, nid in sorted(entries.items(), key=lambda e: int(e[0])):
                if nid not in g.keys or nid in out:
                    continue
                full = g.keys[nid][1]
                if weights is not None and k in weights and weights[k] in g.keys:
                    w = weights[k]
                    out[nid] = (w, _slot_name(full.rsplit("/", 1)[-1], g.keys[w][1], local.strip("_")))
                elif weights is None and full.count("/") >= 2:
                    slot, wfull = full.split("/", 2)[1:]
                    hits = by_full.get(wfull, [])
                    if used[slot, wfull] < len(hits):
                        out[nid] = (hits[used[slot, wfull]], slot)
                        used[slot, wfull] += 1
    return out


def annotate(nodes: list[Node]) -> dict[str, tuple[SourceRole, str]]:
    """For each checkpoint key holding a variable: its role with its model name, and its
    ``full_name`` (docs/mapping.md, "TF2 names").

    The role is ``param`` (a model weight or statistic), ``optimizer`` (slots, moments, counters),
    ``ema`` (an average of the param named in ``ema_of``) or ``meta`` (``save_counter``, variables
    of metrics, an export archive's second copies). A param is named by ``_param_names``, a slot
    ``optimizer/<weight>/<slot>`` (``slot_of`` names the weight), anything else by its ``full_name`` when that
    is a scoped, unique name, else by its checkpoint key.
    """
    g = _Graph(nodes)
    ema_of, trainable = g.links()
    candidates = {nid for nid in g.keys if nid not in ema_of and nid not in g.copies and (
        nid in trainable or not g.opt_paths or not g.paths.get(nid) or
        not all(g.under_optimizer(p) for p in g.paths[nid]))}
    slots = _slots(g, [nid for nid in g.keys if nid in candidates])
    roles = {nid: g.role(nid, ema_of, trainable, slots) for nid in g.keys}
    names = _param_names(g, [nid for nid, r in roles.items() if r is Role.PARAM])
    for nid, (w, slot) in slots.items():
        if w in names and nid in g.keys:
            names[nid] = f"{SLOT_ROOT}/{names[w]}/{slot}"
    unnamed = [nid for nid in g.keys if nid not in names]
    if unnamed:
        fulls = Counter(full for _, full in g.keys.values())
        taken = set(names.values())  # every name given so far (a set: a list scan per variable is quadratic)
        for nid in unnamed:
            key, full = g.keys[nid]
            good = "/" in full and fulls[full] == 1 and full not in taken
            names[nid] = full if good else _strip_key(key)
            taken.add(names[nid])
    if not ema_of and not slots:  # no links to name: the loop below without its lookups
        return {key: (SourceRole(roles[nid], names[nid]), full) for nid, (key, full) in g.keys.items()}
    out: dict[str, tuple[SourceRole, str]] = {}
    for nid, (key, full) in g.keys.items():
        ema = names[ema_of[nid]] if nid in ema_of and ema_of[nid] in names else None
        weight = slots[nid][0] if nid in slots else None
        slot_of = names[weight] if weight is not None and weight in names and weight in g.keys else None
        out[key] = (SourceRole(roles[nid], names[nid], ema, slot_of), full)
    return out
