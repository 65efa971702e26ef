"""The TF2 object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``), decoded without TensorFlow.

A TF2 checkpoint names each value by one shortest path through the graph of
trackable objects; a model's weight may appear only under the optimizer
(``optimizer/_trainable_variables/N``) or an EMA object. Decoding the graph gives
every path to each variable, its ``full_name`` (Keras's readable variable path),
and which slot variables belong to which variable, so names and roles can be
assigned by what a value *is*, not by the accident of its key.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import FormatError
from ..wire import fields

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
                ref_id, local = -1, ""
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
                orig = slot_node = -1
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
            if len(known) >= limit or any(p.startswith(k + "/") for k in known):  # no cycles
                continue
            known.append(p)
            queue.append((child, p))
    return paths


#: Attributes holding metric objects (Keras 2 ``keras_api/metrics``, compiled metrics): their variables are ``meta``.
METRIC_CONTAINERS = frozenset({"metrics", "_metrics", "compiled_metrics", "_compile_metrics", "metrics_variables"})

#: Keras 3 optimizer lists whose K-th entry belongs to ``_trainable_variables/K``.
_KERAS_EMA_LIST = "_model_variables_moving_average"
_KERAS_TRAINABLE_LIST = "_trainable_variables"


def _strip_key(key: str) -> str:
    i = key.find(ATTRIBUTES)
    return key[:i] if i >= 0 else key


def annotate(nodes: list[Node]) -> dict[str, dict[str, str]]:
    """For each checkpoint key holding a variable: its model name and role.

    ``role`` is ``param`` (a model weight or statistic), ``optimizer`` (slots,
    moments, counters), ``ema`` (an average of the param named in ``ema_of``) or
    ``meta`` (``save_counter``, variables of metrics). ``model_name`` is Keras's readable variable path
    (``full_name``) when it is a scoped, unique name, otherwise the object path
    that does not pass through an optimizer.
    """
    paths = all_paths(nodes)
    optimizers = {nid for nid, node in enumerate(nodes)
                  if any(local == _KERAS_TRAINABLE_LIST for local, _ in node.children) or node.slots}
    opt_paths = {p for nid in optimizers for p in paths.get(nid, [])}
    keys: dict[int, tuple[str, str]] = {}
    for node in nodes:
        for name, full, key in node.attributes:
            if name == "VARIABLE_VALUE" and key:
                keys[node.id] = (key, full)

    ema_of: dict[int, int] = {}
    trainable: set[int] = set()
    slot_of: dict[int, int] = {}
    for nid in optimizers:
        children = dict(nodes[nid].children)
        lists = {local: dict(nodes[child].children) for local, child in nodes[nid].children
                 if local in (_KERAS_TRAINABLE_LIST, _KERAS_EMA_LIST)}
        params = lists.get(_KERAS_TRAINABLE_LIST, {})
        trainable.update(params.values())
        for k, avg in lists.get(_KERAS_EMA_LIST, {}).items():
            if k in params:
                ema_of[avg] = params[k]
        for orig, _slot_name, slot_node in nodes[nid].slots:
            slot_of[slot_node] = orig
        del children

    def under_optimizer(p: str) -> bool:
        return any(p == o or p.startswith(o + "/") for o in opt_paths)

    def model_path(nid: int) -> str:
        ps = paths.get(nid, [])
        outside = [p for p in ps if not under_optimizer(p)]
        return (outside or ps or [""])[0]

    fulls = [full for _, full in keys.values()]
    out: dict[str, dict[str, str]] = {}
    for nid, (key, full) in keys.items():
        if nid in ema_of:
            role = "ema"
        elif nid in slot_of:
            role = "optimizer"
        elif nid in trainable:
            role = "param"
        elif paths.get(nid) and all(under_optimizer(p) for p in paths[nid]):
            role = "optimizer"
        elif paths.get(nid) == ["save_counter"] or paths.get(nid) and all(
                METRIC_CONTAINERS.intersection(p.split("/")) for p in paths[nid]):
            role = "meta"
        else:
            role = "param"
        if "/" in full and fulls.count(full) == 1:
            name = full
        else:
            name = model_path(nid) if role == "param" else ""
            name = name or _strip_key(key)
        info = {"model_name": name, "role": role, "full_name": full}
        out[key] = info
    for nid, (key, _) in keys.items():
        if nid in ema_of and ema_of[nid] in keys:
            out[key]["ema_of"] = out[keys[ema_of[nid]][0]]["model_name"]
        if nid in slot_of and slot_of[nid] in keys:
            out[key]["slot_of"] = out[keys[slot_of[nid]][0]]["model_name"]
    return out
