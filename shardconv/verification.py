"""``verify``: re-read an output, every stored checksum, and (with the source) every value.

The output is read as any source is (its own checksums checked on the way); with ``src`` the
plan the output was written with is rebuilt (from the mapping it records, or the one given)
and every output byte is compared with what that plan produces from the source, chunk by chunk
within the memory budget. Both inputs are closed whatever happens.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .api import make_plan, mapping_options
from .core.budget import Budget
from .core.integrity import IntegrityTracker
from .core.plan import Copy, OutputTensor, Plan, chunk_plan
from .core.types import Role, TensorInfo
from .errors import ChecksumError, UsageError, VerifyError
from .frontend import DEFAULT_MAX_MEMORY, MAPPING_OPTIONS, options_list
from .progress import ProgressArg
from .progress import start as start_progress
from .sinks import REGISTRY as SINKS
from .sinks import sink_for
from .sources import Source, open_source
from .util.units import parse_size

if TYPE_CHECKING:  # the mapping layer loads on first use
    from .mapping.options import MappingOptions

__all__ = ["verify"]


def verify(dest: str | os.PathLike[str], src: Any = None, *, max_memory: str | int = DEFAULT_MAX_MEMORY,
           progress: ProgressArg = False, step: int | None = None, mapping: MappingOptions | None = None,
           **options: Any) -> dict[str, Any]:
    """Re-read an output: every stored checksum, and (with ``src``) every value against the source.

    ``mapping`` (a MappingOptions) or keyword options: the mapping options given to ``convert``,
    for an output that records none.
    Returns: counts (``tensors``, ``bytes_compared``, ``checksums_verified``,
    ``source_checksums_verified``). Raises: VerifyError naming the first tensor that differs;
    UsageError, SourceError, FormatError for trouble reading either side."""
    chunk = Budget.for_limit(parse_size(max_memory)).chunk_bytes
    given = mapping_options(mapping, **options)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open_source(dest))
        ref = None
        if src is not None:
            ref = stack.enter_context(open_source(src, step=step))
        return _Check(str(dest), out, ref, chunk, given).run(progress)


@dataclass
class _Check:
    """One verify: the output, the reference source (or None), the chunk size, the mapping given."""

    dest: str
    out: Source
    ref: Source | None
    chunk: int
    mapping: MappingOptions

    def run(self, progress: ProgressArg) -> dict[str, Any]:
        """Read every stored tensor (compared with the source when there is one); then every
        stored checksum must have been checked. Returns: the counts."""
        stored = _stored(self.out)
        plan = _reference_plan(self.dest, self.out, self.ref, stored, self.mapping) if self.ref else None
        want = {o.name: o for o in plan.outputs} if plan is not None else {}
        tracker = IntegrityTracker(self.out.units())
        ref_tracker = IntegrityTracker(self.ref.units()) if self.ref is not None else None
        buffers = (np.empty(self.chunk, np.uint8), np.empty(self.chunk, np.uint8))
        bar = start_progress(progress, sum(t.nbytes for t in stored.values()), 0,
                             f"verify {os.path.basename(self.dest)}")
        compared = 0
        try:
            for name, t in stored.items():
                compared += self._tensor(name, t, want.get(name), buffers, tracker, ref_tracker, bar)
        finally:
            if bar is not None:
                bar.close()
        self._all_checked(tracker, stored)
        return {"tensors": len(stored), "bytes_compared": compared, "checksums_verified": len(tracker.verified),
                "source_checksums_verified": len(ref_tracker.verified) if ref_tracker else 0}

    def _tensor(self, name: str, t: TensorInfo, want: OutputTensor | None, buffers: tuple[np.ndarray, np.ndarray],
                tracker: IntegrityTracker, ref_tracker: IntegrityTracker | None, bar: Any) -> int:
        """Read stored tensor ``t`` (output ``name``) chunk by chunk; with ``want``, compare each
        chunk with the source's bytes. Returns: the bytes compared. Raises: VerifyError."""
        compared = 0
        for c in chunk_plan([OutputTensor(t.name, t.dtype, t.shape, Copy(t.name))], self.chunk):
            if bar is not None:
                bar.update(c.length)
            got = buffers[0].data[: c.length]
            try:
                tracker.add(self.out.read_into(t.name, c.offset, got))
            except ChecksumError as e:  # the output differs from what was written: a difference, not trouble
                raise VerifyError(str(e)) from e
            if want is None or self.ref is None or ref_tracker is None:
                continue
            expected = buffers[1].data[: c.length]
            ref_tracker.add(want.producer.fill(c.offset, expected, self.ref.read_into))
            if got != expected:
                raise VerifyError(f"{self.dest}: tensor {name!r} differs from the source in bytes "
                                  f"[{c.offset}, {c.offset + c.length})")
            compared += c.length
        return compared

    def _all_checked(self, tracker: IntegrityTracker, stored: dict[str, TensorInfo]) -> None:
        """Every checksum the output stores (those of string tensors aside) was checked.
        Raises: VerifyError naming a few that were not."""
        units = self.out.units()
        names = {t.name for t in stored.values()}
        string_units = {k for k, u in units.items() if u.tensor not in names}
        missing = sorted(set(units) - tracker.verified - string_units)
        if missing:
            raise VerifyError(f"{self.dest}: {len(missing)} stored checksums could not be checked ({missing[:3]})")


def _stored(out: Source) -> dict[str, TensorInfo]:
    """The output's tensors under the names its own metadata gives them (a SavedModel's object
    graph); string tensors are the format's. Bookkeeping tensors (role META) are read, their
    checksums checked, but no source tensor is expected for them."""
    from .mapping.roles import role_of

    stored = [t for t in out.tensors() if not t.is_string]
    return {role_of(t).name: t for t in stored}


def _reference_plan(dest: str, out: Source, ref: Source, outputs: dict[str, TensorInfo],
                    mapping: MappingOptions) -> Plan:
    """The plan ``ref`` gives under ``mapping`` (by default the one ``out`` records), checked
    name by name, dtype and shape against ``outputs``. An output that records no mapping
    (SavedModel) and matches no default mapping is trouble, not a difference: UsageError."""
    given = mapping.given()
    recorded = _recorded_mapping(out)
    plan = make_plan(ref, mapping if given else mapping_options(**recorded))
    if out.format in SINKS:  # what the output's format cannot hold is not in it
        plan = plan.leave_out(sink_for(dest, out.format).leave_out)
    want = {o.name: o for o in plan.outputs}
    missing = sorted(set(want) - set(outputs))
    extra = sorted(n for n in set(outputs) - set(want) if not _is_meta(outputs[n]))
    if (missing or extra) and not given and not recorded:
        raise UsageError(f"{dest}: the output does not record the mapping it was converted with, and under the "
                         f"default mapping its tensors are not the source's (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); pass the mapping options given to convert ({options_list()})")
    if missing or extra:
        raise VerifyError(f"{dest}: tensors differ from the source: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, o in want.items():
        t = outputs[name]
        if (t.dtype, tuple(t.shape)) != (o.dtype, tuple(o.shape)):
            raise VerifyError(f"{dest}: tensor {name!r} is {t.dtype}{list(t.shape)}, source gives "
                              f"{o.dtype}{list(o.shape)}")
    return plan


def _is_meta(t: TensorInfo) -> bool:
    """A bookkeeping tensor of the format (an object graph), not one of the model's."""
    return t.role is not None and t.role.role == Role.META


def _recorded_mapping(out: Source) -> dict[str, Any]:
    """The mapping options an output was written with (from its manifest), to rebuild its plan."""
    opts = dict(out.recorded_options())
    rules = opts.pop("rules", None)
    keep = {k: opts[k] for k in MAPPING_OPTIONS if k in opts and k not in ("rules", "preset")}
    if rules:
        keep["rules"] = rules
    return keep
