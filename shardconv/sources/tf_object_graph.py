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
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, compress, islice, repeat
from operator import add, countOf, itemgetter, sub
from typing import Literal, cast

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
    ``parse_strict`` decodes it again, so results and errors are those of ``parse_strict``.
    ``roles`` is ``annotate(parse(...))`` without a ``Node`` per node."""
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
# The same decoding as ``_strict_nodes``, into ``_Flat``'s parallel lists: TensorFlow's variable
# nodes and runs of container nodes in bulk (``_bulk`` cuts out every variable node by one regex
# split, ``_piecewise`` one candidate at a time where that fails; ``_containers``: what they take is
# checked to be exactly what protobuf reads there), any other node in plain loops over ``bytes`` (no
# generator, no memoryview, one-byte varints and keys read inline). Every condition under which
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
    """``_scan``'s graph as ``Node`` objects."""
    return _scan(blob).nodes()


class _Flat:
    """A decoded graph in parallel arrays, without an object per node: per node its children
    (None: none), the variable nodes of TensorFlow's common shape as three lists (node id, key,
    full name: their only attribute), and the attributes and slot references of the others.

    The children of a run of container nodes (``_containers``) stay undecoded in ``_runs`` until
    ``kids`` or ``edges`` is read; a graph of weights alone (``_annotate_plain``) needs only their
    names (``local_names``), the root's children and how often one node is referenced."""

    __slots__ = ("_kids", "_edges", "_runs", "vids", "vkeys", "vfulls", "attrs", "slots", "top")

    def __init__(self) -> None:
        self._kids: list[list[tuple[str, int]] | None] = []
        self._edges: list[tuple[str, int]] = []
        #: (first node, each child's local name and node id as stored, each node's first child there)
        self._runs: list[tuple[int, list[bytes], list[bytes], list[int]]] = []
        self.vids: list[int] = []
        self.vkeys: list[str] = []
        self.vfulls: list[str] = []
        self.attrs: dict[int, list[tuple[str, str, str]]] = {}
        self.slots: dict[int, list[tuple[int, str, int]]] = {}
        self.top = -1  # the largest node id any child or slot reference names

    @classmethod
    def of_nodes(cls, nodes: list[Node]) -> _Flat:
        """``nodes`` (as ``parse`` returns them: node K is ``nodes[K]``) in this form."""
        flat = cls()
        flat._kids = [node.children or None for node in nodes]
        flat.attrs = {node.id: node.attributes for node in nodes if node.attributes}
        flat.slots = {node.id: node.slots for node in nodes if node.slots}
        flat._edges = [ref for node in nodes for ref in node.children]
        return flat

    @property
    def kids(self) -> list[list[tuple[str, int]] | None]:
        """Each node's children (local name, node id); None for none."""
        self._decode_runs()
        return self._kids

    @property
    def edges(self) -> list[tuple[str, int]]:
        """Every child reference of every node, in no particular order."""
        self._decode_runs()
        return self._edges

    def _decode_runs(self) -> None:
        for first, names, ids, bounds in self._runs:
            refs = list(zip(map(str, names, repeat("utf-8"), repeat("replace")), _varints(ids)))
            self._kids[first:first + len(bounds) - 1] = [refs[a:b] or None for a, b in zip(bounds, bounds[1:])]
            self._edges += refs
        self._runs = []

    def children(self, nid: int) -> list[tuple[str, int]] | None:
        """``kids[nid]``, decoding no other node's children."""
        for first, names, ids, bounds in self._runs:
            if first <= nid < first + len(bounds) - 1:
                a, b = bounds[nid - first], bounds[nid - first + 1]
                return list(zip(map(str, names[a:b], repeat("utf-8"), repeat("replace")), _varints(ids[a:b]))) or None
        return self._kids[nid]

    def local_names(self) -> set[str]:
        """Every child's local name (each distinct stored name decoded once)."""
        out = set(map(itemgetter(0), self._edges))
        for _, names, _, _ in self._runs:
            out.update(b.decode("utf-8", "replace") for b in set(names))
        return out

    def references(self, nid: int) -> int:
        """How many child references name node ``nid``."""
        n = countOf(map(itemgetter(1), self._edges), nid)
        stored = _varint_bytes(nid)  # a run's ids are canonical varints of 1-3 bytes
        return n + sum(ids.count(stored) for _, _, ids, _ in self._runs)

    def nodes(self) -> list[Node]:
        attrs = dict(zip(self.vids, ([(_VARIABLE_VALUE, f, k)] for k, f in zip(self.vkeys, self.vfulls))))
        attrs.update(self.attrs)
        return [Node(nid, list(kids or ()), attrs.get(nid, []), self.slots.get(nid, []))
                for nid, kids in enumerate(self.kids)]

    def keys(self) -> dict[int, tuple[str, str]]:
        """Variable node -> (checkpoint key, full_name): its last ``VARIABLE_VALUE`` attribute with a key."""
        keys = dict(zip(self.vids, zip(self.vkeys, self.vfulls)))
        more = {nid: (key, full) for nid, attributes in self.attrs.items()
                for name, full, key in attributes if name == _VARIABLE_VALUE and key}
        if more:
            keys.update(more)
            keys = dict(sorted(keys.items()))
        return keys

    def variables(self) -> tuple[list[int], list[str], list[str]]:
        """``keys()`` as three lists: node ids, checkpoint keys, full names."""
        if not any(name == _VARIABLE_VALUE for attributes in self.attrs.values() for name, _, _ in attributes):
            return self.vids, self.vkeys, self.vfulls
        keys = self.keys()
        return list(keys), [k for k, _ in keys.values()], [f for _, f in keys.values()]


_VARIABLE_VALUE = "VARIABLE_VALUE"
#: A ``VARIABLE_VALUE`` attribute's name field and the key of the full name after it; in TensorFlow's
#: variable node (``0A ln 12 la`` + this + ``lf full 1A lk key``, then ``2A 02 08 01``: has_checkpoint_values)
#: it starts 4 bytes into the node.
_VAR_MARK = b"\x0a\x0eVARIABLE_VALUE\x12"
_VAR_TAIL = b"\x2a\x02\x08\x01"


def _scan(blob: bytes) -> _Flat:
    """The graph in ``_Flat`` form, or ``_Bail``: by ``_bulk`` where it decides, else ``_piecewise``."""
    try:
        flat = _bulk(blob)
    except (_Bail, IndexError):  # a cut made where no node starts, or malformed: _piecewise decides
        flat = None
    return flat if flat is not None else _piecewise(blob)


#: TensorFlow's variable node (node length, attribute length, ``VARIABLE_VALUE``, full name length, full name,
#: key length, key, the tail ``2A 02 08 01`` or none) in the blob read as latin-1; groups: the four lengths,
#: the two names, ``*`` where the tail is there. What it takes is checked by ``_bulk``. The full name is
#: at most 127 bytes (its length is one byte): bounded so, a try at each marker reads at most that far
#: (unbounded, a graph of markers with no key field after them costs time quadratic in its size; the
#: key needs no bound: nothing after it must match, so a try that reaches it succeeds).
_VAR_NODE = re.compile(r"\n([\x00-\x7f])\x12([\x00-\x7f])\n\x0eVARIABLE_VALUE\x12([\x00-\x7f])([^\x1a]{0,127})"
                       r"\x1a([\x01-\x7f])([^*\n]*)(?:(\*)\x02\x08\x01)?")
_TAIL_LEN = {"*": 4, None: 0}.__getitem__


def _bulk(blob: bytes) -> _Flat | None:
    """The graph, with every variable node of TensorFlow's shape cut out by one ``_VAR_NODE.split``
    and what lies between them decoded by ``_nodes_until``; None where that is not certainly the
    graph (then ``_piecewise`` decodes it).

    A match is the node protobuf reads there if the fields between the matches end exactly where
    each match starts (``_nodes_until`` returns that very position) and its four lengths agree
    with its bytes (``_var_lengths``)."""
    # a str of the bytes (the names need no decoding where they are ASCII), split into what lies
    # between the matches, then 7 groups per match; only the names and the lengths are kept
    parts = _VAR_NODE.split(blob.decode("latin-1"))
    lns = _var_lengths(parts)
    if lns is None:
        return None
    gaps = list(map(len, parts[0::8]))
    flat = _Flat()
    flat.vfulls, flat.vkeys = parts[4::8], parts[6::8]
    del parts
    kids, vids = flat._kids, flat.vids
    done = at = 0  # the variables before match ``done`` are in ``flat``; that match starts at ``at``
    for i in compress(range(len(gaps)), gaps):  # gap i: after match i - 1, before match i
        vids += range(len(kids), len(kids) + i - done)
        kids += repeat(None, i - done)
        start = at + sum(lns[done:i]) + 2 * (i - done)
        at = start + gaps[i]
        if _nodes_until(blob, start, at, flat) != at:
            return None
        done = i
    vids += range(len(kids), len(kids) + len(gaps) - 1 - done)
    kids += repeat(None, len(gaps) - 1 - done)
    _utf8(flat)
    return flat


def _var_lengths(parts: list[str | None]) -> bytes | None:
    """The node lengths of ``_VAR_NODE.split``'s matches if every length in them agrees with the
    bytes matched (full name, key, attribute, node: with or without the tail), else None.

    The sums are checked on all matches at once: each list of lengths as one int of 16-bit lanes
    (``_lanes``), where no sum of lengths under 256 carries into the next lane."""
    ln, la, lf, lk = ("".join(parts[k::8]).encode("latin-1") for k in (1, 2, 3, 5))  # type: ignore[arg-type]
    try:
        if bytes(map(len, parts[4::8])) != lf or bytes(map(len, parts[6::8])) != lk:  # type: ignore[arg-type]
            return None
    except ValueError:  # a name of 256 bytes or more: not what was matched
        return None
    ones, attribute = _lanes(b"\x01" * len(ln)), _lanes(la)
    if (attribute != _lanes(lf) + _lanes(lk) + 20 * ones
            or _lanes(ln) != attribute + _lanes(bytes(map(_TAIL_LEN, parts[7::8]))) + 2 * ones):
        return None
    return ln


def _lanes(values: bytes) -> int:
    """``values`` as one int, each in its own 16 bits: the K-th is ``(x >> 16 * K) & 0xFFFF``."""
    wide = bytearray(2 * len(values))
    wide[0::2] = values
    return int.from_bytes(wide, "little")


def _utf8(flat: _Flat) -> None:
    """The variables' names read as latin-1, as UTF-8 (latin-1 is UTF-8 only for ASCII)."""
    for texts in (flat.vfulls, flat.vkeys):
        if not "".join(texts).isascii():
            texts[:] = [t if t.isascii() else t.encode("latin-1").decode("utf-8", "replace") for t in texts]


def _piecewise(blob: bytes) -> _Flat:
    """``_scan``, one candidate variable node at a time.

    TensorFlow's variable nodes are found by splitting the blob at ``_VAR_MARK``: one piece per
    variable, starting with its full name. A candidate is taken as a variable node only where the
    nodes before it end exactly at its start and every length in it agrees with the bytes (then
    protobuf reads exactly these fields there); all else (other nodes, other shapes, the mark inside
    a name) is decoded by ``_nodes_until``: runs of containers in bulk, other nodes one by one."""
    flat = _Flat()
    pos, stop = 0, len(blob)
    pieces = blob.split(_VAR_MARK)
    text = blob.decode("latin-1")  # a str of the bytes: its slices need no decoding where they are ASCII
    vids, vfulls, vkeys, kids = flat.vids, flat.vfulls, flat.vkeys, flat._kids
    a = len(pieces[0])  # where the next mark starts
    try:
        for piece in islice(pieces, 1, None):
            s = a - 4  # the node, if the mark is in a variable node of TensorFlow's shape
            if s > pos:
                pos = _nodes_until(blob, pos, s, flat)
            if s == pos:
                ln, lf = blob[s + 1], blob[a + 17]
                k = a + lf + 20  # the key; the full name is at a + 18
                lk = blob[k - 1]
                e = s + 2 + ln
                tail = e - k - lk
                if (blob[s] == 0x0A and blob[s + 2] == 0x12 and ln < 0x80 and blob[k - 2] == 0x1A and lk
                        and blob[s + 3] == lf + lk + 20
                        and (tail == 4 and blob[e - 4:e] == _VAR_TAIL or tail == 0 and e <= stop)):
                    vids.append(len(kids))
                    kids.append(None)
                    vfulls.append(text[a + 18:k - 2])
                    vkeys.append(text[k:k + lk])
                    pos = e
                else:  # not TensorFlow's variable node: decoded field by field
                    pos = _nodes_until(blob, pos, s + 1, flat)
            a += len(_VAR_MARK) + len(piece)
        _nodes_until(blob, pos, stop, flat)
    except IndexError:  # a key as the blob's last byte: wire.fields says it is truncated
        raise _Bail from None
    _utf8(flat)
    return flat


def _nodes_until(blob: bytes, pos: int, until: int, flat: _Flat) -> int:
    """Decodes the top-level fields from ``pos`` on until one ends at or after ``until``; where it ends."""
    stop = len(blob)
    if until - pos > 256 and _containers(blob, pos, until, flat):
        return until
    while pos < until:
        if blob[pos] == 0x0A:  # field 1 (a node), length-delimited: nearly every field
            val, pos = _varint(blob, pos + 1, stop)
            if val > stop - pos:
                raise _Bail
            _node(blob, pos, pos + val, flat)
        else:
            num, wt, pos = _key(blob, pos, stop)
            val, pos = _value(blob, pos, stop, wt)
            if wt != 2:
                continue
        pos += val
    return pos


#: A child reference as TensorFlow writes it: a one-byte length, the node id (a canonical varint of at
#: most 3 bytes), the local name (one-byte length), the name: assumed to run to the next field key.
_CHILD = re.compile(rb"\x0a([\x00-\x7f])\x08([\x00-\x7f]|[\x80-\xff][\x01-\x7f]|[\x80-\xff]{2}[\x01-\x7f])"
                    rb"\x12([\x00-\x7f])([^\x0a\x12\x1a\x2a]*)")


#: The fields of a run of container nodes as TensorFlow writes them (children, then has_checkpoint_values):
#: a child reference (as ``_CHILD``), or the end of one node and the start of the next (its length).
_CONTAINERS = re.compile(_CHILD.pattern + rb"|\x2a\x02\x08\x01\x0a([\x00-\x7f]|[\x80-\xff][\x01-\x7f]|[\x80-\xff]{2}[\x01-\x7f])")


_LITTLE: Iterable[Literal["little"]] = repeat("little")


def _varint_value(x: int) -> int:
    """The value of a varint of 1-3 bytes read as a little-endian ``x`` (7 bits of each byte, which
    ``x`` has 8 bits apart). Of canonical varints, the larger ``x`` is the larger value."""
    return x & 0x7F | x >> 1 & 0x3F80 | x >> 2 & 0x1FC000


def _varint_bytes(n: int) -> bytes:
    """``n`` as a canonical varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _varints(raw: Iterable[bytes]) -> list[int]:
    """Varints of 1-3 bytes: 7 bits of each byte (int.from_bytes reads them 8 bits apart)."""
    return [x & 0x7F | x >> 1 & 0x3F80 | x >> 2 & 0x1FC000 for x in map(int.from_bytes, raw, _LITTLE)]


def _containers(blob: bytes, pos: int, until: int, flat: _Flat) -> bool:
    """Decodes [pos, until) into ``flat`` if it is a run of nodes holding only children and
    has_checkpoint_values, by one ``_CONTAINERS.split``; False (``flat`` untouched) if not.

    The matches are the fields protobuf reads only if they tile the range (nothing between them),
    each child's length and name length agree with what was matched, and each node's length with
    its children: all checked. The references are decoded when they are needed (``_Flat.kids``)."""
    if blob[pos] != 0x0A or blob[until - 4:until] != _VAR_TAIL:
        return False
    try:
        first, start = _varint(blob, pos + 1, until)
    except _Bail:
        return False
    parts = _CONTAINERS.split(blob[start:until - 4])  # between, then 5 groups per match (None: not in it)
    lcs, heads = parts[1::6], parts[5::6]
    ids, names = list(compress(parts[2::6], lcs)), list(compress(parts[4::6], lcs))  # child tokens: with a length
    name_lens, child_lens = list(map(len, names)), list(b"".join(compress(lcs, lcs)))
    if (any(parts[0::6]) or list(b"".join(compress(parts[3::6], lcs))) != name_lens
            or child_lens != list(map(add, map(len, ids), map(add, name_lens, repeat(3))))):
        return False
    ends = list(compress(range(len(lcs)), heads))  # token index of each node's end but the last's
    bounds = [0, *map(sub, ends, range(len(ends))), len(ids)]  # each node's first child token
    sizes = [0, *accumulate(map(add, child_lens, repeat(2)))]
    if any(n != sizes[b] - sizes[a] + 4 for n, a, b in zip([first, *_varints(compress(heads, heads))], bounds, bounds[1:])):
        return False
    flat._runs.append((len(flat._kids), names, ids, bounds))
    flat._kids += [None] * (len(bounds) - 1)
    if ids:
        flat.top = max(flat.top, _varint_value(max(map(int.from_bytes, ids, _LITTLE))))  # see _varint_value
    return True


def _node(buf: bytes, pos: int, stop: int, flat: _Flat) -> None:
    """Decodes one node into ``flat``."""
    children: list[tuple[str, int]] = []
    attributes: list[tuple[str, str, str]] = []
    slots: list[tuple[int, str, int]] = []
    if stop - pos > 2 and buf[pos] == 0x0A and buf[pos + 2] == 0x08:  # children first, as TensorFlow writes them
        pos = _children(buf, pos, stop - 4 if buf[stop - 4:stop] == _VAR_TAIL else stop, children)
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
    nid = len(flat._kids)
    flat._kids.append(children or None)
    if children:
        flat._edges += children
        flat.top = max(flat.top, max([ref for _, ref in children]))
    if attributes:
        flat.attrs[nid] = attributes
    if slots:
        flat.slots[nid] = slots
        flat.top = max(flat.top, max([max(orig, slot) for orig, _, slot in slots]))


def _children(buf: bytes, pos: int, stop: int, children: list[tuple[str, int]]) -> int:
    """A run of child references filling [pos, stop) exactly, decoded by one ``_CHILD.findall`` and
    added to ``children``: where the field after them starts (``pos`` where they do not fill it).

    The matches are the fields protobuf reads there only if each child's length and name length
    agree with what was matched and the matches tile the range; all three are checked."""
    found = _CHILD.findall(buf, pos, stop)
    if not found:
        return pos
    lcs, ids, lns, names = zip(*found)
    lens = list(map(len, names))
    child_lens = list(b"".join(lcs))
    if (list(b"".join(lns)) != lens or child_lens != list(map(add, map(len, ids), map(add, lens, repeat(3))))
            or sum(child_lens) + 2 * len(child_lens) != stop - pos):
        return pos
    children += zip(map(str, names, repeat("utf-8"), repeat("replace")), _varints(ids))
    return stop


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
    return _bfs_paths([node.children for node in nodes], limit)


def _bfs_paths(kids: Sequence[Sequence[tuple[str, int]] | None], limit: int = 16) -> dict[int, list[str]]:
    """``all_paths`` of the graph whose node K has the children ``kids[K]``."""
    paths: dict[int, list[str]] = {0: [""]} if kids else {}
    queue = deque([(0, "")]) if kids else deque()
    while queue:
        nid, path = queue.popleft()
        prefix = f"{path}/" if path else ""
        for local, child in kids[nid] or ():
            p = prefix + local
            known = paths.get(child)
            if known is None:  # the first path to ``child``: nearly every edge
                paths[child] = [p]
            elif len(known) >= limit or any(not k or p.startswith(k + "/") for k in known):  # no cycles
                continue
            else:
                known.append(p)
            if kids[child]:  # a node without children adds nothing to the queue
                queue.append((child, p))
    return paths


def _is_tree(kids: Sequence[Sequence[tuple[str, int]] | None], edges: list[tuple[str, int]]) -> bool:
    """No node is a child twice (of one node or of two) and the root is nobody's child: then each
    node the root reaches has one path, and ``_tree_paths`` gives ``_bfs_paths``'s answer."""
    ids = set(map(itemgetter(1), edges))
    return bool(kids) and len(ids) == len(edges) and 0 not in ids


def _tree_paths(kids: Sequence[Sequence[tuple[str, int]] | None]) -> dict[int, tuple[str]]:
    """``_bfs_paths`` of a graph for which ``_is_tree`` holds (each path in a 1-tuple), one parent
    at a time instead of one edge at a time."""
    paths: dict[int, tuple[str]] = {0: ("",)}
    parents = [(0, "")]
    while parents:
        below: list[tuple[int, str]] = []
        for nid, path in parents:
            refs = kids[nid] or ()
            prefix = f"{path}/" if path else ""
            ps = [prefix + local for local, _ in refs]
            ids = list(map(itemgetter(1), refs))
            paths.update(zip(ids, zip(ps)))
            below += [(c, p) for c, p in zip(ids, ps) if kids[c]]
        parents = below
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

    def __init__(self, flat: _Flat) -> None:
        self.kids = kids = flat.kids
        self.slot_refs = flat.slots
        self.paths: Mapping[int, Sequence[str]] = (
            _tree_paths(kids) if _is_tree(kids, flat.edges) else _bfs_paths(kids))
        self.locals = locals_ = set(map(itemgetter(0), flat.edges))
        self.keras3 = not locals_.isdisjoint(_KERAS3_MARKS)
        self.metrics = not locals_.isdisjoint(METRIC_CONTAINERS)  # does any path pass through a metric?
        marks = (_KERAS_TRAINABLE_LIST, "_iterations")
        self.optimizers = set(flat.slots)  # slot references make an optimizer, and so do these children
        if not locals_.isdisjoint(marks):
            self.optimizers |= {nid for nid, refs in enumerate(kids) if refs and any(
                local in marks for local, _ in refs)}
        self.opt_paths = {p for nid in self.optimizers for p in self.paths.get(nid, [])}
        self._below_opt = tuple(o + "/" for o in self.opt_paths)  # what a path under an optimizer starts with
        self.keys = flat.keys()  # variable node -> (checkpoint key, full_name)
        self.copies: set[int] = set()
        if kids and any(local == _EXPORT_COPIES for local, _ in kids[0] or ()):
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
        """``p`` is an optimizer's path or below one."""
        return p in self.opt_paths or p.startswith(self._below_opt)

    def model_path(self, nid: int) -> str:
        ps = self.paths.get(nid, [])
        outside = [p for p in ps if not self.under_optimizer(p)]
        return (outside or ps or [""])[0]

    def lists(self, nid: int) -> dict[str, dict[str, int]]:
        """An optimizer's list children: name -> {index: node}."""
        return {local: dict(self.kids[child] or ()) for local, child in self.kids[nid] or ()}

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
        if _only_save_counter(ps) or ps and self.metrics and all(METRIC_CONTAINERS.intersection(p.split("/"))
                                                                 for p in ps):
            return Role.META
        return Role.PARAM


def _param_names(g: _Graph, params: list[int]) -> dict[int, str]:
    """Each param's name: its ``full_name`` (the variable's Keras/TF name) where that has a scope,
    else its object path outside the optimizer; a Keras 3 model's own name scope dropped
    (``strip_model_scope``); repeats made unique by ``dedupe`` in the order of their keys.

    ``params`` come in ``g.keys`` order; they are sorted (``natural_key`` costs microseconds a
    key) only where two names collide, the only case where their order changes a name."""
    fulls = list(map(itemgetter(1), map(g.keys.__getitem__, params)))
    if all(["/" in full for full in fulls]):  # every name a scoped full_name: _named in bulk
        names = strip_model_scope(fulls) if g.keras3 else fulls
        if len(set(names)) == len(names):
            return dict(zip(params, names))
    return _named(g, params)


def _named(g: _Graph, params: list[int]) -> dict[int, str]:
    """``_param_names``, one param at a time."""
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
        for orig, slot_name, slot_node in g.slot_refs.get(opt, ()):
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
    flat = _Flat.of_nodes(nodes)
    plain = _annotate_plain(flat)
    return plain if plain is not None else _annotate(_Graph(flat))


def roles(blob: bytes, where: str) -> dict[str, tuple[SourceRole, str]]:
    """``annotate(parse(blob, where))``, without a ``Node`` per node: what listing a TF2 checkpoint
    costs per variable (``_scan``; what it does not decode, ``parse_strict`` decodes and reports)."""
    try:
        flat = _scan(bytes(blob))
    except _Bail:
        return annotate(parse_strict(blob, where))
    if flat.top >= len(flat._kids):
        _checked(flat.nodes(), f"{where}: object graph")  # raises: a reference outside the graph
    plain = _annotate_plain(flat)
    return plain if plain is not None else _annotate(_Graph(flat))


#: Children that make a graph more than its model's weights: optimizers, metrics, export copies.
_NOT_PLAIN = frozenset({_KERAS_TRAINABLE_LIST, "_iterations", _EXPORT_COPIES, ""}) | METRIC_CONTAINERS


def _annotate_plain(flat: _Flat) -> dict[str, tuple[SourceRole, str]] | None:
    """``_annotate`` of a graph of weights alone (no slot references, no child that makes an
    optimizer, a metric or an export copy, none named ""), where every param's ``full_name`` is
    scoped and unique, in bulk over ``flat``'s lists; None for any other graph.

    With no optimizer there are no slots, averages or trained-weight lists, so every variable is a
    param but a root child ``save_counter`` that no other node references (its only path is
    ``save_counter``): that one is ``meta``, named as ``_annotate`` names the unnamed."""
    locals_ = flat.local_names()
    if flat.slots or not locals_.isdisjoint(_NOT_PLAIN):
        return None
    nids, keys, fulls = flat.variables()
    meta = [i for local, nid in (flat.children(0) or () if flat._kids else ()) if local == "save_counter"
            for i in [bisect_left(nids, nid)] if i < len(nids) and nids[i] == nid]
    if any(flat.references(nids[i]) != 1 for i in meta) or len(meta) > 1:
        return None
    params = fulls if not meta else fulls[:meta[0]] + fulls[meta[0] + 1:]
    if not all(["/" in full for full in params]):
        return None
    names = strip_model_scope(params) if not locals_.isdisjoint(_KERAS3_MARKS) else params
    if len(set(names)) != len(names):
        return None
    roles = [Role.PARAM] * len(nids)
    if meta:
        i = meta[0]
        good = "/" in fulls[i] and fulls.count(fulls[i]) == 1 and fulls[i] not in names
        names = names[:i] + [fulls[i] if good else _strip_key(keys[i])] + names[i:]
        roles[i] = Role.META
    notes = map(tuple.__new__, repeat(SourceRole), zip(roles, names, repeat(None), repeat(None)))
    return dict(zip(keys, zip(notes, fulls)))


def _annotate(g: _Graph) -> dict[str, tuple[SourceRole, str]]:
    """``annotate`` of the graph ``g``."""
    ema_of, trainable = g.links()
    candidates = {nid for nid in g.keys if nid not in ema_of and nid not in g.copies and (
        nid in trainable or not g.opt_paths or not g.paths.get(nid) or
        not all(g.under_optimizer(p) for p in g.paths[nid]))}
    slots = _slots(g, [nid for nid in g.keys if nid in candidates])
    roles = _roles(g, ema_of, trainable, slots)
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
    if not ema_of and not slots:  # no links to name
        return _unlinked_notes(g, roles, names)
    return _notes(g, roles, names, ema_of, slots)


def _unlinked_notes(g: _Graph, roles: dict[int, Role], names: dict[int, str]) -> dict[str, tuple[SourceRole, str]]:
    """``_notes`` where no variable is an average or a slot, in bulk (a SourceRole made by ``tuple.__new__``)."""
    nids = list(g.keys)
    notes = map(tuple.__new__, repeat(SourceRole), zip(map(roles.__getitem__, nids), map(names.__getitem__, nids),
                                                       repeat(None), repeat(None)))
    return dict(zip(map(itemgetter(0), g.keys.values()), zip(notes, map(itemgetter(1), g.keys.values()))))


def _notes(g: _Graph, roles: dict[int, Role], names: dict[int, str], ema_of: dict[int, int],
           slots: dict[int, tuple[int, str]]) -> dict[str, tuple[SourceRole, str]]:
    """By checkpoint key: each variable's role, name and links to the params it averages or belongs to, and
    full_name; column by column (a link to a node without a name is None: only variables have names)."""
    nids = list(g.keys)
    weight_of = {nid: weight for nid, (weight, _) in slots.items()}
    name_of = cast(Callable[[int | None], str | None], names.get)  # None (no link) has no name
    notes = map(tuple.__new__, repeat(SourceRole), zip(map(roles.__getitem__, nids), map(names.__getitem__, nids),
                                                       map(name_of, map(ema_of.get, nids)),
                                                       map(name_of, map(weight_of.get, nids))))
    return dict(zip(map(itemgetter(0), g.keys.values()), zip(notes, map(itemgetter(1), g.keys.values()))))


def _only_save_counter(ps: Sequence[str] | None) -> bool:
    return ps is not None and len(ps) == 1 and ps[0] == "save_counter"


def _roles(g: _Graph, ema_of: dict[int, int], trainable: set[int], slots: dict[int, tuple[int, str]]) -> dict[int, Role]:
    """Each variable's ``_Graph.role``. Without optimizers, averages, metrics or export copies every
    variable is a param but ``save_counter``; where no child is named "" only the root's children
    have one-component paths, so only a root child can be ``save_counter``: those are decided in bulk."""
    if ema_of or slots or trainable or g.copies or g.opt_paths or g.metrics or "" in g.locals:
        return {nid: g.role(nid, ema_of, trainable, slots) for nid in g.keys}
    out = dict.fromkeys(g.keys, Role.PARAM)
    for local, nid in g.kids[0] or () if g.kids else ():
        if local == "save_counter" and nid in out and _only_save_counter(g.paths.get(nid)):
            out[nid] = Role.META
    return out
