"""The Python API; the CLI is a thin layer over these functions (``verify`` is in ``shardconv.verification``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core import engine
from .core.destination import Destination
from .core.plan import Plan
from .core.types import TensorInfo
from .errors import DestinationError, UsageError
from .frontend import DEFAULT_MAX_MEMORY
from .progress import ProgressArg
from .sinks import require, sink_for
from .sources import Source, open_source
from .util.units import parse_size

if TYPE_CHECKING:  # the mapping layer loads on first use
    from .mapping.options import MappingOptions, RulesArg

__all__ = ["DEFAULT_MAX_MEMORY", "convert", "finalize", "list_tensors", "make_plan", "mapping_options", "plan"]


def list_tensors(src: Any, **source_options: Any) -> list[TensorInfo]:
    """Every tensor of a checkpoint (name, dtype, shape, bytes), reading no values."""
    with open_source(src, **source_options) as s:
        return s.tensors()


def make_plan(source: Source, rules: MappingOptions | RulesArg = None, **options: Any) -> Plan:
    """The plan for ``source``: names and roles, EMA/optimizer switches, selection, then rules.

    ``rules``: a ``MappingOptions``, or the rules alone (a TOML file path or a list of rule
    dicts). ``options``: the other mapping options by name, as ``MappingOptions`` lists them
    (``preset``: a shipped rule set, its rules first; ``prefer_ema``, ``drop_optimizer``,
    ``allow_unmapped``, ``names``; ``include`` / ``exclude``: globs (``*`` also matches ``/``)
    on the names ``list_tensors`` and ``shardconv ls`` show; ``dtype``: cast every
    floating-point tensor no rule casts). Explicit switches override a rule file's [options].

    Returns: the Plan (reads no values). Raises: UsageError for an unknown option or preset,
    PlanError listing every problem of the mapping."""
    from .mapping import MappingOptions, build_plan

    if isinstance(rules, MappingOptions):
        if options:
            raise UsageError(f"make_plan: pass the mapping options in the MappingOptions, not also as "
                             f"{', '.join(sorted(options))}")
        return build_plan(source, rules)
    return build_plan(source, MappingOptions.from_mapping({"rules": rules, **options}))


def mapping_options(mapping: MappingOptions | None = None, **options: Any) -> MappingOptions:
    """The mapping options of a call: ``mapping`` as given, or built from the keyword arguments
    (``prefer_ema=True``, ...; None counts as not given).

    Returns: a MappingOptions. Raises: UsageError for an unknown name, or for both forms at once."""
    from .mapping import MappingOptions

    if mapping is None:
        return MappingOptions.from_mapping(options)
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise UsageError(f"pass the mapping options in mapping= or as keywords, not both ({', '.join(given)})")
    return mapping


def plan(src: Any, *, step: int | None = None, mapping: MappingOptions | None = None, **options: Any) -> Plan:
    """The plan a conversion would follow; reads no tensor values. Mapping options: ``mapping``
    (a MappingOptions) or keywords, as ``make_plan`` takes them.

    Returns: the Plan (its source closed: the plan describes, it does not convert). Raises:
    UsageError, SourceError, FormatError, PlanError."""
    with open_source(src, step=step) as source:
        return make_plan(source, mapping_options(mapping, **options))


def convert(src: Any, dest: str | os.PathLike, *, to: str | None = None, max_memory: str | int = DEFAULT_MAX_MEMORY,
            overwrite: bool = False, restart: bool = False, fsync: bool = True, progress: ProgressArg = False,
            step: int | None = None, sink_options: dict[str, Any] | None = None,
            mapping: MappingOptions | None = None, workers: int | None = None, client: Any = None,
            share_size: str | int | None = None, **options: Any) -> engine.Result:
    """Convert a checkpoint to ``dest`` within ``max_memory``; resumes an interrupted run.

    ``progress``: ``True`` draws a bar (a widget in a notebook), a callable is called as
    ``progress(done_bytes, total_bytes)`` as the output is written.

    Mapping options: ``mapping`` (a MappingOptions) or keywords (``rules``, ``preset``,
    ``drop_optimizer``, ...), as ``make_plan`` takes them. ``sink_options``: the output format's
    options (``Sink.Options`` fields; text is parsed as on the command line).

    ``workers`` (local processes) or ``client`` (a ``dask.distributed.Client``): split the
    conversion into shares of about ``share_size`` bytes run by those workers, each within
    ``max_memory`` (docs/scale-out.md); the output is the same bytes.

    Returns: the engine's Result. Raises: what ``engine.run`` raises; UsageError for options."""
    opts = mapping_options(mapping, **options)
    created = _make_parents(dest)
    try:
        if workers is not None or client is not None:
            return _convert_split(src, dest, to, max_memory, overwrite, restart, fsync, progress, step,
                                  sink_options, opts, workers, client, share_size)
        with open_source(src, step=step) as source:
            plan = make_plan(source, opts)
            sink = sink_for(dest, to, **(sink_options or {}))
            require(sink.name)
            plan = plan.leave_out(sink.leave_out)
            return engine.run(plan, sink, dest, max_memory=parse_size(max_memory), overwrite=overwrite,
                              restart=restart, fsync=fsync, progress=progress)
    except BaseException:
        _remove_empty(created)  # refused or failed before anything was left in them
        raise


def _convert_split(src: Any, dest: str | os.PathLike, to: str | None, max_memory: str | int, overwrite: bool,
                   restart: bool, fsync: bool, progress: ProgressArg, step: int | None,
                   sink_options: dict[str, Any] | None, opts: MappingOptions, workers: int | None, client: Any,
                   share_size: str | int | None) -> engine.Result:
    """``convert`` over worker processes or a Dask client (``shardconv.workers``)."""
    from . import workers as split

    job = split.job_for(src, dest, to=to, step=step, sink_options=sink_options, mapping=opts.given(),
                        max_memory=parse_size(max_memory), fsync=fsync)
    return split.convert(job, workers=workers, client=client, overwrite=overwrite, restart=restart,
                         share_bytes=parse_size(share_size) if share_size is not None else None, progress=progress)


def finalize(dest: str | os.PathLike, *, overwrite: bool = False) -> engine.Result:
    """Publish the output the job-array tasks (``--share I/N``) of a split conversion wrote, once
    every share is done; reads no tensor data (``shardconv finalize``).

    Returns: the Result. Raises: ResumeError if nothing was prepared there or shares are unfinished."""
    from . import workers as split

    return split.finalize(os.fspath(dest), overwrite=overwrite)


def _make_parents(dest: str | os.PathLike) -> list[Path]:
    """Create the missing parent directories of a local ``dest`` (``mkdir -p``, as a TF
    Serving ``models/NAME/`` needs); return those created, deepest first."""
    where = Destination.parse(dest)
    if where.is_url:
        return []
    missing = []
    p = where.path.parent
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
