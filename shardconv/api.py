"""The Python API; the CLI is a thin layer over these functions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .core import engine
from .core.plan import Plan, chunk_plan
from .core.types import TensorInfo
from .errors import ChecksumError, DestinationError, UsageError, VerifyError
from .frontend import MAPPING_OPTIONS
from .progress import ProgressArg
from .progress import start as start_progress
from .sinks import REGISTRY as SINKS
from .sinks import require, sink_for
from .sources import Source, open_source
from .util.units import parse_size

DEFAULT_MAX_MEMORY = "512MiB"


def list_tensors(src: Any, **source_options: Any) -> list[TensorInfo]:
    """Every tensor of a checkpoint (name, dtype, shape, bytes), reading no values."""
    with open_source(src, **source_options) as s:
        return s.tensors()


def make_plan(source: Source, rules: str | os.PathLike | list[dict[str, Any]] | None = None, *,
              preset: str | None = None, prefer_ema: bool | None = None, drop_optimizer: bool | None = None,
              allow_unmapped: bool | None = None, names: str | None = None,
              include: str | list[str] | None = None, exclude: str | list[str] | None = None,
              dtype: str | None = None) -> Plan:
    """The plan for ``source``: names and roles, EMA/optimizer switches, selection, then rules.

    ``rules`` is a TOML file path or a list of rule dicts; ``preset`` names a shipped
    rule set (its rules come first). Explicit switches override a rule file's [options].
    ``include`` / ``exclude``: globs (``*`` also matches ``/``) on the names ``list_tensors``
    and ``shardconv ls`` show, keeping only names an include matches and no exclude does;
    ``dtype``: cast every floating-point tensor no rule casts (e.g. ``"bfloat16"``).
    """
    from .mapping import build_plan, load_preset, load_rules_file

    rule_list: list[dict[str, Any]] = []
    options: dict[str, Any] = {}
    origins: dict[str, str] = {}  # where each option of a preset or rules file came from, for messages
    if preset:
        r, o = load_preset(preset)
        rule_list += r
        options.update(o)
        origins.update(dict.fromkeys(o, f"preset {preset}"))
    if isinstance(rules, (str, os.PathLike)):
        r, o = load_rules_file(rules)
        rule_list += r
        options.update(o)
        origins.update(dict.fromkeys(o, f"rules file {os.path.basename(rules)}"))
    elif rules:
        rule_list += list(rules)
    return build_plan(source, rule_list or None, options=options, origins=origins, prefer_ema=prefer_ema,
                      drop_optimizer=drop_optimizer, allow_unmapped=allow_unmapped, names=names,
                      include=include, exclude=exclude, dtype=dtype)


def plan(src: Any, *, step: int | None = None, **mapping: Any) -> Plan:
    """The plan a conversion would follow; reads no tensor values."""
    source = open_source(src, **({"step": step} if step is not None else {}))
    return make_plan(source, **mapping)


def convert(src: Any, dest: str | os.PathLike, *, to: str | None = None, max_memory: str | int = DEFAULT_MAX_MEMORY,
            overwrite: bool = False, restart: bool = False, fsync: bool = True, progress: ProgressArg = False,
            step: int | None = None, sink_options: dict[str, Any] | None = None,
            **mapping: Any) -> engine.Result:
    """Convert a checkpoint to ``dest`` within ``max_memory``; resumes an interrupted run.

    ``progress``: ``True`` draws a bar (a widget in a notebook), a callable is called as
    ``progress(done_bytes, total_bytes)`` as the output is written.

    Mapping arguments (``rules``, ``preset``, ``prefer_ema``, ``drop_optimizer``,
    ``allow_unmapped``, ``names``, ``include``, ``exclude``, ``dtype``) are those of ``make_plan``.
    """
    source_options = {"step": step} if step is not None else {}
    with open_source(src, **source_options) as source:
        plan = make_plan(source, **mapping)
        sink = sink_for(dest, to, **(sink_options or {}))
        require(sink.name)
        plan = plan.leave_out(sink.leave_out)
        created = _make_parents(dest)
        try:
            return engine.run(plan, sink, dest, max_memory=parse_size(max_memory), overwrite=overwrite,
                              restart=restart, fsync=fsync, progress=progress)
        except BaseException:
            _remove_empty(created)  # refused or failed before anything was left in them
            raise


def _make_parents(dest: str | os.PathLike) -> list[Path]:
    """Create the missing parent directories of a local ``dest`` (``mkdir -p``, as a TF
    Serving ``models/NAME/`` needs); return those created, deepest first."""
    from .formats import tsio

    if tsio.is_remote(dest):
        return []
    missing = []
    p = tsio.local_path(dest).parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        except OSError as e:
            _remove_empty(missing)
            raise DestinationError(f"{d}: cannot create the destination's directory: {e.strerror}") from None
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def verify(dest: str | os.PathLike, src: Any = None, *, max_memory: str | int = DEFAULT_MAX_MEMORY,
           progress: ProgressArg = False, step: int | None = None, **mapping: Any) -> dict[str, Any]:
    """Re-read an output: every stored checksum, and (with ``src``) every value against the source.

    Returns counts; raises VerifyError naming the first tensor that differs.
    """
    import numpy as np

    from .core.budget import Budget
    from .core.integrity import IntegrityTracker

    budget = Budget.for_limit(parse_size(max_memory))
    chunk = budget.chunk_bytes
    out = open_source(dest)
    ref = open_source(src, **({"step": step} if step is not None else {})) if src is not None else None
    checked = compared = 0
    try:
        from .mapping.roles import role_of

        tracker = IntegrityTracker(out.units())
        # Output tensors under the names the output's own metadata gives them (a SavedModel's
        # object graph); string tensors and bookkeeping are the format's, not the model's.
        stored = [t for t in out.tensors() if not t.is_string and (t.extra or {}).get("role") != "meta"]
        outputs = {role_of(t).name: t for t in stored}
        plan = _reference_plan(dest, out, ref, outputs, mapping) if ref is not None else None
        want = {o.name: o for o in plan.outputs} if plan is not None else {}
        a = np.empty(chunk, np.uint8)
        b = np.empty(chunk, np.uint8)
        ref_tracker = IntegrityTracker(ref.units()) if ref is not None else None
        bar = start_progress(progress, sum(t.nbytes for t in stored), 0, f"verify {os.path.basename(str(dest))}")
        for oname, t in outputs.items():
            for c in chunk_plan([_as_output(t)], chunk):
                if bar is not None:
                    bar.update(c.length)
                va = memoryview(a)[: c.length]
                try:
                    tracker.add(out.read_into(t.name, c.offset, va))
                except ChecksumError as e:  # the output differs from what was written: a difference, not trouble
                    raise VerifyError(str(e)) from e
                if plan is not None:
                    vb = memoryview(b)[: c.length]
                    segs = want[oname].producer.fill(c.offset, vb, ref.read_into)
                    ref_tracker.add(segs)
                    if va != vb:
                        raise VerifyError(f"{dest}: tensor {oname!r} differs from the source in bytes "
                                          f"[{c.offset}, {c.offset + c.length})")
                    compared += c.length
            checked += 1
        if bar is not None:
            bar.close()
        string_units = {k for k, u in out.units().items() if u.tensor not in {t.name for t in stored}}
        missing = sorted(set(out.units()) - tracker.verified - string_units)
        if missing:
            raise VerifyError(f"{dest}: {len(missing)} stored checksums could not be checked ({missing[:3]})")
        return {"tensors": checked, "bytes_compared": compared, "checksums_verified": len(tracker.verified),
                "source_checksums_verified": len(ref_tracker.verified) if ref_tracker else 0}
    finally:
        out.close()
        if ref is not None:
            ref.close()


def _reference_plan(dest: Any, out: Source, ref: Source, outputs: dict[str, TensorInfo],
                    mapping: dict[str, Any]) -> Plan:
    """The plan ``ref`` gives under ``mapping`` (by default the one ``out`` records), checked
    name by name, dtype and shape against ``outputs``. An output that records no mapping
    (SavedModel) and matches no default mapping is trouble, not a difference: UsageError."""
    from .frontend import options_list

    given = {k: v for k, v in mapping.items() if v is not None}
    recorded = _recorded_mapping(out)
    plan = make_plan(ref, **(given or recorded))
    if out.format in SINKS:  # what the output's format cannot hold is not in it
        plan = plan.leave_out(sink_for(dest, out.format).leave_out)
    want = {o.name: o for o in plan.outputs}
    missing = sorted(set(want) - set(outputs))
    extra = sorted(set(outputs) - set(want))
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


def _recorded_mapping(out: Source) -> dict[str, Any]:
    """The mapping options an output was written with (from its manifest), to rebuild its plan."""
    manifest = getattr(out, "manifest_options", None)
    if not manifest:
        return {}
    opts = dict(manifest)
    rules = opts.pop("rules", None)
    keep = {k: opts[k] for k in MAPPING_OPTIONS if k in opts and k not in ("rules", "preset")}
    if rules:
        keep["rules"] = rules
    return keep


def _as_output(t: TensorInfo):
    from .core.plan import Copy, OutputTensor

    return OutputTensor(t.name, t.dtype, t.shape, Copy(t.name))
