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

from ..errors import FormatError
from ..formats.wire import fields

ATTRIBUTES = "/.ATTRIBUTES/"


@dataclass
class Node:
    id: int
    children: list[tuple[str, int]] = field(default_factory=list)      # (local name, node id)
    attributes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, full_name, checkpoint_key)
    slots: list[tuple[int, str, int]] = field(default_factory=list)      # (variable node, slot name, slot node)


def _text(v: object) -> str:
    return bytes(v).decode("utf-8", errors="replace")


def parse(blob: bytes, where: str) -> list[Node]:
    """Nodes of a serialized ``TrackableObjectGraph`` (node 0 is the root)."""
    nodes: list[Node] = []
    what = f"{where}: object graph"
    for num, wt, val in fields(blob, what):
        if num != 1 or wt != 2:
            continue
        node = Node(len(nodes))
        for n2, w2, v2 in fields(val, what):
            if n2 == 1 and w2 == 2:
                ref_id, local = 0, ""
                for n3, w3, v3 in fields(v2, what):
                    if n3 == 1 and w3 == 0:
                        ref_id = v3
                    elif n3 == 2 and w3 == 2:
                        local = _text(v3)
                node.children.append((local, ref_id))
            elif n2 == 2 and w2 == 2:
                name = full = key = ""
                for n3, w3, v3 in fields(v2, what):
                    if w3 != 2:
                        continue
                    if n3 == 1:
                        name = _text(v3)
                    elif n3 == 2:
                        full = _text(v3)
                    elif n3 == 3:
                        key = _text(v3)
                node.attributes.append((name, full, key))
            elif n2 == 3 and w2 == 2:
                orig = slot_node = 0
                slot_name = ""
                for n3, w3, v3 in fields(v2, what):
                    if n3 == 1 and w3 == 0:
                        orig = v3
                    elif n3 == 2 and w3 == 2:
                        slot_name = _text(v3)
                    elif n3 == 3 and w3 == 0:
                        slot_node = v3
                node.slots.append((orig, slot_name, slot_node))
        nodes.append(node)
    for node in nodes:
        for local, ref in node.children:
            if not 0 <= ref < len(nodes):
                raise FormatError(f"{what}: node {node.id} child {local!r} points at node {ref} of {len(nodes)}")
        for orig, _, slot in node.slots:
            if not (0 <= orig < len(nodes) and 0 <= slot < len(nodes)):
                raise FormatError(f"{what}: node {node.id} has a slot variable reference outside the graph")
    return nodes


def all_paths(nodes: list[Node], limit: int = 16) -> dict[int, list[str]]:
    """Every node's paths from the root, shortest first (at most ``limit`` each)."""
    paths: dict[int, list[str]] = {0: [""]} if nodes else {}
    queue = deque([(0, "")]) if nodes else deque()
    while queue:
        nid, path = queue.popleft()
        for local, child in nodes[nid].children:
            p = f"{path}/{local}" if path else local
            known = paths.setdefault(child, [])
            if len(known) >= limit or any(not k or p.startswith(k + "/") for k in known):  # no cycles
                continue
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
    """Sort key comparing the numbers in ``key`` as numbers (``_variables/2`` before ``_variables/10``)."""
    return [int(p) if p.isdigit() else p for p in _DIGITS.split(key)]


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
    taken, seen, out = set(names), Counter(), []
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
        self.keras3 = any(local in _KERAS3_MARKS for node in nodes for local, _ in node.children)
        self.optimizers = {nid for nid, node in enumerate(nodes) if node.slots or any(
            local in (_KERAS_TRAINABLE_LIST, "_iterations") for local, _ in node.children)}
        self.opt_paths = {p for nid in self.optimizers for p in self.paths.get(nid, [])}
        self.keys: dict[int, tuple[str, str]] = {}   # variable node -> (checkpoint key, full_name)
        for node in nodes:
            for name, full, key in node.attributes:
                if name == "VARIABLE_VALUE" and key:
                    self.keys[node.id] = (key, full)
        outside = {full for nid, (_, full) in self.keys.items() if not self.only_under(nid, _EXPORT_COPIES)}
        self.copies = {nid for nid, (_, full) in self.keys.items()
                       if full and full in outside and self.only_under(nid, _EXPORT_COPIES)}

    def only_under(self, nid: int, top: str) -> bool:
        ps = self.paths.get(nid)
        return bool(ps) and all(p.split("/", 1)[0] == top for p in ps)

    def under_optimizer(self, p: str) -> bool:
        return any(p == o or p.startswith(o + "/") for o in self.opt_paths)

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

    def role(self, nid: int, ema_of: dict[int, int], trainable: set[int], slots: dict[int, tuple[int, str]]) -> str:
        ps = self.paths.get(nid)
        if nid in ema_of:
            return "ema"
        if nid in slots:
            return "optimizer"
        if nid in trainable:
            return "param"
        if nid in self.copies:
            return "meta"
        if ps and all(self.under_optimizer(p) for p in ps):
            return "optimizer"
        if ps == ["save_counter"] or ps and all(METRIC_CONTAINERS.intersection(p.split("/")) for p in ps):
            return "meta"
        return "param"


def _param_names(g: _Graph, params: list[int]) -> dict[int, str]:
    """Each param's name: its ``full_name`` (the variable's Keras/TF name) where that has a scope,
    else its object path outside the optimizer; a Keras 3 model's own name scope dropped
    (``strip_model_scope``); repeats made unique by ``dedupe`` in the order of their keys."""
    params = sorted(params, key=lambda nid: natural_key(g.keys[nid][0]))
    named = [nid for nid in params if "/" in g.keys[nid][1]]
    fulls = [g.keys[nid][1] for nid in named]
    if g.keras3:
        fulls = strip_model_scope(fulls)
    base = dict(zip(named, fulls))
    names = [base.get(nid) or g.model_path(nid) or _strip_key(g.keys[nid][0]) for nid in params]
    return dict(zip(params, dedupe(names)))


def _slot_name(leaf: str, weight_full: str, fallback: str) -> str:
    """Keras 3 calls a slot ``<weight path joined by _>_<slot>``: the ``<slot>`` part, else ``fallback``."""
    flat = weight_full.replace("/", "_") + "_"
    return leaf[len(flat):] if weight_full and leaf.startswith(flat) and len(leaf) > len(flat) else fallback


def _slots(g: _Graph, params: set[int]) -> dict[int, tuple[int, str]]:
    """Slot variable -> (its weight, the slot's name): TF's slot references (Keras 2 legacy optimizers),
    a Keras 3 optimizer's per-weight lists (entry K belongs to ``_trainable_variables/K``), and a
    Keras 2 optimizer's variables named ``<Optimizer>/<slot>/<weight's full name>``."""
    out: dict[int, tuple[int, str]] = {}
    by_full: dict[str, list[int]] = {}
    for nid in sorted(params, key=lambda n: natural_key(g.keys[n][0])):
        by_full.setdefault(g.keys[nid][1], []).append(nid)
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


def annotate(nodes: list[Node]) -> dict[str, dict[str, str]]:
    """For each checkpoint key holding a variable: its model name and role (docs/mapping.md, "TF2 names").

    ``role`` is ``param`` (a model weight or statistic), ``optimizer`` (slots, moments, counters),
    ``ema`` (an average of the param named in ``ema_of``) or ``meta`` (``save_counter``, variables
    of metrics, an export archive's second copies). A param is named by ``_param_names``, a slot
    ``optimizer/<weight>/<slot>`` (``slot_of`` names the weight), anything else by its ``full_name`` when that
    is a scoped, unique name, else by its checkpoint key.
    """
    g = _Graph(nodes)
    ema_of, trainable = g.links()
    candidates = {nid for nid in g.keys if nid not in ema_of and nid not in g.copies and (
        nid in trainable or not g.paths.get(nid) or not all(g.under_optimizer(p) for p in g.paths[nid]))}
    slots = _slots(g, candidates)
    roles = {nid: g.role(nid, ema_of, trainable, slots) for nid in g.keys}
    names = _param_names(g, [nid for nid, r in roles.items() if r == "param"])
    for nid, (w, slot) in slots.items():
        if w in names and nid in g.keys:
            names[nid] = f"{SLOT_ROOT}/{names[w]}/{slot}"
    fulls = Counter(full for _, full in g.keys.values())
    for nid, (key, full) in g.keys.items():
        if nid not in names:
            good = "/" in full and fulls[full] == 1 and full not in names.values()
            names[nid] = full if good else _strip_key(key)
    out: dict[str, dict[str, str]] = {}
    for nid, (key, full) in g.keys.items():
        out[key] = {"model_name": names[nid], "role": roles[nid], "full_name": full}
        if nid in ema_of and ema_of[nid] in names:
            out[key]["ema_of"] = names[ema_of[nid]]
        if nid in slots and slots[nid][0] in names and slots[nid][0] in g.keys:
            out[key]["slot_of"] = names[slots[nid][0]]
    return out
