"""The Python API; the CLI is a thin layer over these functions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import engine
from .errors import VerifyError
from .plan import Plan, chunk_plan, identity_plan
from .sinks import sink_for
from .sources import Source, TensorInfo, open_source
from .units import parse_size

DEFAULT_MAX_MEMORY = "512MiB"


def list_tensors(src: Any, **source_options: Any) -> list[TensorInfo]:
    """Every tensor of a checkpoint (name, dtype, shape, bytes), reading no values."""
    with open_source(src, **source_options) as s:
        return s.tensors()


def make_plan(source: Source, **options: Any) -> Plan:
    """The plan for ``source``; the mapping layer extends this with rules."""
    return identity_plan(source, options=options)


def convert(src: Any, dest: str | os.PathLike, *, to: str | None = None, max_memory: str | int = DEFAULT_MAX_MEMORY,
            overwrite: bool = False, restart: bool = False, fsync: bool = True, progress: bool = False,
            step: int | None = None, sink_options: dict[str, Any] | None = None) -> engine.Result:
    """Convert a checkpoint to ``dest`` within ``max_memory``; resumes an interrupted run."""
    source_options = {"step": step} if step is not None else {}
    with open_source(src, **source_options) as source:
        plan = make_plan(source)
        sink = sink_for(dest, to, **(sink_options or {}))
        return engine.run(plan, sink, dest, max_memory=parse_size(max_memory), overwrite=overwrite,
                          restart=restart, fsync=fsync, progress=progress)


def verify(dest: str | os.PathLike, src: Any = None, *, max_memory: str | int = DEFAULT_MAX_MEMORY,
           progress: bool = False) -> dict[str, Any]:
    """Re-read an output: every stored checksum, and (with ``src``) every value against the source.

    Returns counts; raises VerifyError naming the first tensor that differs.
    """
    import numpy as np

    from .budget import Budget
    from .integrity import IntegrityTracker

    budget = Budget.for_limit(parse_size(max_memory))
    chunk = budget.chunk_bytes
    out = open_source(dest)
    ref = open_source(src) if src is not None else None
    checked = compared = 0
    try:
        tracker = IntegrityTracker(out.units())
        outputs = {t.name: t for t in out.tensors()}
        plan = make_plan(ref) if ref is not None else None
        if plan is not None:
            want = {o.name: o for o in plan.outputs}
            missing = sorted(set(want) - set(outputs))
            extra = sorted(set(outputs) - set(want))
            if missing or extra:
                raise VerifyError(f"{dest}: tensors differ from the source: missing {missing[:5]}, unexpected {extra[:5]}")
            for name, o in want.items():
                t = outputs[name]
                if (t.dtype, tuple(t.shape)) != (o.dtype, tuple(o.shape)):
                    raise VerifyError(f"{dest}: tensor {name!r} is {t.dtype}{list(t.shape)}, source gives "
                                      f"{o.dtype}{list(o.shape)}")
        a = np.empty(chunk, np.uint8)
        b = np.empty(chunk, np.uint8)
        ref_tracker = IntegrityTracker(ref.units()) if ref is not None else None
        for t in out.tensors():
            for c in chunk_plan([_as_output(t)], chunk):
                va = memoryview(a)[: c.length]
                tracker.add(out.read_into(t.name, c.offset, va))
                if plan is not None:
                    vb = memoryview(b)[: c.length]
                    segs = want[t.name].producer.fill(c.offset, vb, ref.read_into)
                    ref_tracker.add(segs)
                    if va != vb:
                        raise VerifyError(f"{dest}: tensor {t.name!r} differs from the source in bytes "
                                          f"[{c.offset}, {c.offset + c.length})")
                    compared += c.length
            checked += 1
        return {"tensors": checked, "bytes_compared": compared, "checksums_verified": len(tracker.verified),
                "source_checksums_verified": len(ref_tracker.verified) if ref_tracker else 0}
    finally:
        out.close()
        if ref is not None:
            ref.close()


def _as_output(t: TensorInfo):
    from .plan import Copy, OutputTensor

    return OutputTensor(t.name, t.dtype, t.shape, Copy(t.name))
