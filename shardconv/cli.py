"""Command line: ``shardconv ls | plan | convert | verify | finalize``. Errors print one line; --debug shows tracebacks.

Each command is a thin layer over the Python API (``api``, ``verification``, ``workers``); the output
formats' flags are generated from their sinks' options dataclasses (``Sink.Options``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from typing import Any

from . import __version__
from .errors import ShardconvError, VerifyError
from .frontend import DEFAULT_MAX_MEMORY, MAPPING_OPTIONS, command_line
from .util.units import format_size, parse_size

#: Bidirectional-text controls: they reorder what a terminal shows, so they are escaped too.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: unwinds like Ctrl-C (the partial output stays resumable)."""


def one_line(text: str) -> str:
    """``text`` with every control character escaped as Python would (``\\n``, ``\\x1b``, ``\\x85``,
    ``\\udc80``): C0, DEL, C1, lone surrogates, line/paragraph separators and bidi controls. The
    result prints as exactly one line and cannot drive the terminal."""
    if text.isprintable():  # the common case; no character isprintable() accepts is escaped below
        return text

    def safe(c: str) -> str:
        if c in _BIDI or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
            return c.encode("unicode_escape", "backslashreplace").decode("ascii")
        return c
    return "".join(map(safe, text))


def _say(*parts: Any) -> None:
    """Print one message line to stderr, escaped (see ``one_line``)."""
    print(one_line(" ".join(map(str, parts))), file=sys.stderr)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summaries")


VERIFY_HELP = """Re-read DEST: every stored checksum, and with SRC every value against the source.

exit status (as cmp and diff): 0 the output is intact (and equal to SRC), 1 it differs
(a checksum or a value), 2 trouble (bad arguments, unreadable input, a mapping that
cannot be recovered)."""


def _mapping(p: argparse.ArgumentParser, title: str = "see docs/mapping.md") -> None:
    """The mapping options (frontend.MAPPING_OPTIONS), each a flag."""
    switch = {"action": "store_const", "const": True, "default": None}
    specs: dict[str, dict[str, Any]] = {
        "rules": {"metavar": "FILE", "help": "TOML file of mapping rules ([[rules]] tables, optional [options])"},
        "preset": {"metavar": "NAME", "help": "a shipped rule set: " + ", ".join(_presets())},
        "prefer_ema": {**switch, "help": "write EMA values under the model's names instead of the raw weights"},
        "drop_optimizer": {**switch, "help": "leave out optimizer state (slots, moments, step counters) and EMA "
                                             "copies"},
        "allow_unmapped": {**switch, "help": "with --rules: keep tensors no rule matches under their own names "
                                             "instead of failing"},
        "names": {"choices": ["model", "keys"], "help": "TF2: name tensors by model variable path (default) or by "
                                                         "raw checkpoint key"},
        "include": {"action": "append", "metavar": "GLOB", "help": "keep only tensors whose name (as ls shows it) "
                    "matches GLOB ('*' also matches '/'); repeatable"},
        "exclude": {"action": "append", "metavar": "GLOB", "help": "leave out tensors whose name (as ls shows it) "
                    "matches GLOB; repeatable"},
        "dtype": {"metavar": "DTYPE", "help": "cast every floating-point tensor no rule casts to DTYPE (float16, "
                  "bfloat16, float32, float64, float8_*)"},
    }
    g = p.add_argument_group(f"mapping ({title})")
    for name in MAPPING_OPTIONS:
        g.add_argument("--" + name.replace("_", "-"), **specs[name])


#: Where the parser puts each output format's option (``--max-file-size`` -> ``sink_option__max_file_size``),
#: apart from every other argument's name.
SINK_DEST = "sink_option__"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that adds some argument groups only when it parses or shows help:
    the output formats' options come from the sink classes, whose modules import NumPy, and
    ``shardconv --help`` must not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def _complete(self) -> None:
        while self.deferred:
            self.deferred.pop(0)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _sink_classes() -> dict[str, Any]:
    """Each output format's sink class (its ``Options`` generate the flags)."""
    from .sinks import REGISTRY, sink_class

    classes = {}
    for fmt in REGISTRY:
        try:
            cls = sink_class(fmt)
        except ImportError:  # a format whose module cannot load takes no flags (convert says why)
            continue
        classes[fmt] = cls
    return classes


def _sink_output(p: argparse.ArgumentParser) -> None:
    """One argument group per output format, generated from its options dataclass: each field a
    ``--flag`` (added once where formats share it, its help naming them)."""
    classes = _sink_classes()
    owners: dict[str, list[str]] = {}  # a field declared by several options classes: the formats taking it
    for fmt, cls in classes.items():
        for f in dataclasses.fields(cls.Options):
            owners.setdefault(f.name, []).append(fmt)
    for name, fmts in owners.items():
        if len({classes[fmt].options_help or fmt for fmt in fmts}) == 1:  # formats of one group
            owners[name] = fmts[:1]
    added: set[str] = set()
    for fmt, cls in classes.items():
        fields = [f for f in dataclasses.fields(cls.Options) if f.name not in added]
        if not fields:
            continue
        g = p.add_argument_group(cls.options_help or f"{fmt} output (--to {fmt})")
        for f in fields:
            added.add(f.name)
            g.add_argument("--" + f.name.replace("_", "-"), **_flag_spec(f, owners[f.name]))


def _flag_spec(f: dataclasses.Field, owners: list[str]) -> dict[str, Any]:
    """``add_argument`` keywords for options field ``f`` (its ``sink_option`` metadata); the value
    stays text, parsed by the options dataclass."""
    meta = f.metadata.get("cli", {})
    help_text = meta.get("help", "") + (f" ({', '.join(owners)})" if len(owners) > 1 else "")
    spec: dict[str, Any] = {"dest": SINK_DEST + f.name, "default": None, "help": help_text}
    if isinstance(f.default, bool):
        return {**spec, "action": "store_const", "const": True}
    if meta.get("choices"):
        spec["choices"] = [str(c) for c in meta["choices"]]
    if meta.get("metavar"):
        spec["metavar"] = meta["metavar"]
    return spec


def _sink_values(args: argparse.Namespace) -> dict[str, Any]:
    """The output format options given on the command line (as text; those not given left out)."""
    return {k[len(SINK_DEST):]: v for k, v in vars(args).items() if k.startswith(SINK_DEST) and v is not None}


def sink_flags(options: dict[str, Any]) -> list[str]:
    """Sink options as command-line flags: ``{"max_file_size": 1048576}`` -> ``["--max-file-size",
    "1048576"]`` (a True switch is its flag alone)."""
    flags: list[str] = []
    for name, value in options.items():
        flags.append("--" + name.replace("_", "-"))
        if value is not True:
            flags.append(str(value))
    return flags


def _presets() -> list[str]:
    """Shipped preset names, for help text: read from the package data, so ``--help``
    imports neither the mapping layer nor NumPy."""
    from pathlib import Path

    return sorted(p.stem for p in (Path(__file__).parent / "mapping" / "presets").glob("*.toml"))


def _mapping_options(args: argparse.Namespace) -> Any:
    """The mapping options given on the command line, a ``MappingOptions`` (imported here:
    the mapping layer loads NumPy, which ``--help`` does not)."""
    from .mapping import MappingOptions

    return MappingOptions.from_args(args)


COMMANDS = ("ls", "plan", "convert", "verify", "finalize")
SRC_HELP = ("the checkpoint: a TF checkpoint prefix or its .index, a checkpoint or SavedModel directory, an .npz "
            "(or a directory of them with an index), a Zarr store, an Orbax or t5x checkpoint, a flax msgpack file")
MAX_MEMORY_HELP = (f"bound on every buffer shardconv allocates (default {DEFAULT_MAX_MEMORY}); units: K, M, G binary as in Docker and "
                   "-Xmx (1K = 1024), KB, MB, GB decimal (1KB = 1000), KiB, MiB, GiB binary, or a number of bytes")


def _formats() -> list[str]:
    """Output format names, from the sink registry (which imports no sink)."""
    from .sinks import REGISTRY

    return list(REGISTRY)


def _source_args(p: argparse.ArgumentParser, budget: bool = True) -> None:
    """--step (and --max-memory), shared by every command that reads a source."""
    p.add_argument("--step", type=int, metavar="N",
                   help="checkpoint step of SRC in a directory of several (default: the latest)")
    if budget:
        p.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY, metavar="SIZE", help=MAX_MEMORY_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardconv", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"shardconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    formats = _formats()
    _ls_parser(sub.add_parser("ls", help="list tensors (name, dtype, shape, size, role) without reading values"))
    _plan_parser(sub.add_parser("plan", help="show what convert would write, reading no values"), formats)
    _convert_parser(sub.add_parser("convert", help="convert a checkpoint, streaming within --max-memory"), formats)
    _verify_parser(sub.add_parser("verify", help="re-read an output and check it against its checksums (and SRC)",
                                  description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter))
    _finalize_parser(sub.add_parser("finalize", help="publish the output the --share I/N tasks of a split "
                                                     "conversion wrote, once all are done (reads no tensor data)"))
    assert tuple(sub.choices) == COMMANDS
    return parser


def _ls_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help=SRC_HELP)
    p.add_argument("--json", action="store_true", help="one JSON list of rows (with slot_of, ema_of) on stdout")
    _source_args(p, budget=False)
    p.add_argument("--names", choices=["model", "keys"], default="model",
                   help="TF2: show model variable paths, the names rules match (default), or raw checkpoint keys")
    _common(p)


def _plan_parser(p: argparse.ArgumentParser, formats: list[str]) -> None:
    p.add_argument("src", help=SRC_HELP)
    p.add_argument("--to", default="npz", choices=formats, metavar="FORMAT",
                   help=f"output format the plan and memory estimate are for: {', '.join(formats)} (default npz)")
    _source_args(p)
    p.add_argument("--json", action="store_true", help="the plan as one JSON object on stdout")
    _mapping(p)
    _common(p)


def _convert_parser(p: argparse.ArgumentParser, formats: list[str]) -> None:
    p.add_argument("src", help=SRC_HELP)
    p.add_argument("dest", help="the output: a path (.npz, .zarr, .safetensors, a directory) or a Zarr URL")
    p.add_argument("--to", choices=formats, metavar="FORMAT",
                   help=f"output format: {', '.join(formats)} (default: from DEST's suffix)")
    _source_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.add_argument("--restart", action="store_true", help="discard a partial output instead of resuming it")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip every fsync (output, journal, directories): faster, and the rename stays atomic, "
                        "but after a power loss the published output may be incomplete")
    p.add_argument("--json", action="store_true", help="print the result (counts, time, what was left out) as one "
                                                       "JSON object on stdout")
    p.add_argument("--dry-run", action="store_true", help="print the plan (as shardconv plan) and write nothing")
    _mapping(p)
    p.deferred.append(_sink_output)  # type: ignore[attr-defined]
    _split_args(p)
    _common(p)


def _split_args(p: argparse.ArgumentParser) -> None:
    """Splitting one conversion over workers (shardconv.workers; docs/scale-out.md)."""
    g = p.add_argument_group("split over workers (see docs/scale-out.md; the output is the same bytes)")
    g.add_argument("--workers", type=int, metavar="N", help="run the shares on N local worker processes, each "
                   "within --max-memory")
    g.add_argument("--scheduler", metavar="ADDR", help="run the shares on a Dask cluster: tcp://HOST:PORT of a "
                   "running scheduler, or local:N to start a LocalCluster of N workers here (shardconv[dask])")
    g.add_argument("--share", metavar="I/N", help="job-array task I of N (no scheduler): run its shares and exit; "
                   "then run 'shardconv finalize DEST' once")
    g.add_argument("--share-size", metavar="SIZE", help="target bytes per share (default: the output's size / 64, "
                   "within 256MiB..4GiB)")


def _finalize_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="the output the --share I/N tasks of a split conversion wrote")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    _common(p)


def _verify_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="the output to check (what convert wrote)")
    p.add_argument("src", nargs="?", help="the checkpoint it was converted from: compare every value with it")
    _source_args(p)
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object on stdout")
    _mapping(p, "with SRC: the options given to convert, for an output that does not record them (SavedModel)")
    _common(p)


def _open_src(args: argparse.Namespace) -> Any:
    """Open SRC (``--step``), saying on stderr which step a directory resolved to."""
    from .sources import open_source, resolution_note

    source = open_source(args.src, step=args.step)
    note = resolution_note(args.src, source, args.step)
    if note and not args.quiet:
        _say(note)
    return source


def _gc_paused(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with the cyclic garbage collector off while it runs: ``ls`` and ``plan`` of
    100 000 tensors make millions of objects, none in a cycle, and every collection meanwhile
    walks all of them (a quarter of their CPU). On again afterwards if it was on before."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        if not gc.isenabled():
            return command(args)
        gc.disable()
        try:
            return command(args)
        finally:
            gc.enable()
    return run


@_gc_paused
def _ls(args: argparse.Namespace) -> int:
    from itertools import islice
    from operator import itemgetter, le

    from .mapping.roles import assign_roles

    with _open_src(args) as source:
        infos = source.tensors()
    roles = assign_roles(infos)
    shown = list(map(itemgetter(1), roles)) if args.names == "model" else [t.name for t in infos]
    if not all(map(le, shown, islice(shown, 1, None))):  # (a TF index lists its keys in order: already sorted)
        order = sorted(range(len(shown)), key=shown.__getitem__)  # stable, as a sort of the rows by name
        shown, infos, roles = [shown[i] for i in order], [infos[i] for i in order], [roles[i] for i in order]
    if args.json:
        rows = [{"name": name, "key": t.name, "role": role.kind, "ema_of": role.ema_of, "slot_of": role.slot_of,
                 "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "checksum": t.checksum}
                for name, t, role in zip(shown, infos, roles)]
        _print_json(rows)
        return 0
    sys.stdout.write(_ls_text(shown, infos, roles))
    if not args.quiet:
        _say(f"{len(shown)} tensors, {format_size(sum(t.nbytes for t in infos))}")
    return 0


def _ls_text(names: list[str], infos: list[Any], roles: list[Any]) -> str:
    """``ls``'s table, one line per tensor (name shown, TensorInfo, role), written at once (20 000
    separate prints cost more than building the rows). Built column by column: the part of a line
    after the name is formatted once per distinct (dtype, shape, size, role), and the columns are
    made by C-level ``map``s and joined at once by ``_table`` (100 000 formatted lines cost more
    than the rest of ``ls``)."""
    from operator import attrgetter, eq, itemgetter

    if any(map(itemgetter(2), roles)) or any(map(itemgetter(3), roles)):  # a role linked to its weight
        whats: Any = [f"ema of {r.ema_of}" if r.ema_of else f"optimizer, slot of {r.slot_of}" if r.slot_of
                      else f"{r.kind}" for r in roles]
    else:
        whats = map(itemgetter(0), roles)
    cols = list(zip(map(attrgetter("dtype"), infos), map(attrgetter("shape"), infos),
                    map(attrgetter("nbytes"), infos), whats))
    rest = {c: f"  {c[0]:<9} {str(list(c[1])):<20} {format_size(c[2]):>10}  {c[3]}" for c in set(cols)}
    width = max(4, max(map(len, names), default=0))
    columns = [list(map(str.ljust, names, repeat(width))), list(map(rest.__getitem__, cols))]
    keys = list(map(attrgetter("name"), infos))
    if keys != names:
        same = list(map(eq, keys, names))
        if any(same):  # "  <- key" where the key is not the name shown: (suffix, "")[key == name]
            columns.append(list(map(tuple.__getitem__, zip(map("  <- ".__add__, keys), repeat("")), same)))
        else:
            columns += [["  <- "] * len(keys), keys]
    return _table(columns)


def _table(columns: list[list[str]]) -> str:
    """The lines whose pieces are ``columns`` (a list each, as long as the others), each ended
    by a newline, as ``_escaped_lines`` writes them; joined at once, without a string per line,
    where the whole text passes its check; else by ``_escaped_lines``."""
    n = len(columns[0])
    text = "".join(chain.from_iterable(zip(*columns, repeat("\n", n))))
    if text.isascii() and len(text.encode("ascii").translate(None, _LINE_CONTROLS)) == len(text) - n:
        return text  # (n newlines deleted, and nothing else: no other newline nor control character)
    return _escaped_lines(list(map("".join, zip(*columns))))


#: Every ASCII character ``str.isprintable`` refuses, but the newline ending each line.
_ASCII_CONTROLS = bytes(range(10)) + bytes(range(11, 32)) + b"\x7f"
#: Those and the newline.
_LINE_CONTROLS = bytes(range(32)) + b"\x7f"


def _escaped_lines(lines: list[str]) -> str:
    """``lines`` joined, each ended by a newline and escaped by ``one_line``. The whole table is
    checked at once (the common case: every line prints as it is): ASCII with no control character
    but the newlines between its lines (bytes.translate, ~20x as fast as ``isprintable``); any
    other table is checked by ``isprintable``, and each line escaped where that fails."""
    text = "\n".join(lines)
    if text.isascii() and text.count("\n") == len(lines) - 1 and \
            len(text.encode("ascii").translate(None, _ASCII_CONTROLS)) == len(text):
        return text + "\n" if lines else ""
    if not "".join(lines).isprintable():
        lines = [one_line(line) for line in lines]
    return "\n".join(lines) + "\n" if lines else ""


def _gc_frozen(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with what exists when it starts (the imports' objects) left out of the cyclic
    garbage collector's walks while it runs, and put back afterwards."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        gc.freeze()
        try:
            return command(args)
        finally:
            gc.unfreeze()
    return run


@_gc_frozen
def _convert(args: argparse.Namespace) -> int:
    from .api import convert

    if args.dry_run:
        return _plan(args)
    if args.workers is not None or args.scheduler or args.share:
        r = _convert_split(args)
        if r is None:
            return 0
    else:
        r = convert(_open_src(args), args.dest, to=args.to, max_memory=args.max_memory, overwrite=args.overwrite,
                    restart=args.restart, fsync=args.fsync, progress=not args.quiet, step=args.step,
                    sink_options=_sink_values(args) or None, mapping=_mapping_options(args))
    _report(args, r)
    return 0


def _convert_split(args: argparse.Namespace) -> Any:
    """``convert`` over workers (``--workers``, ``--scheduler``), or one job-array task (``--share``,
    which returns None: ``finalize`` publishes the output)."""
    from . import workers as split
    from .errors import UsageError

    if args.share and (args.workers is not None or args.scheduler):
        raise UsageError("--share runs one task of a job array; it does not combine with --workers or --scheduler")
    job = split.job_for(args.src, args.dest, to=args.to, step=args.step, sink_options=_sink_values(args) or None,
                        mapping=_mapping_options(args).given(), max_memory=parse_size(args.max_memory),
                        fsync=args.fsync)
    share_bytes = parse_size(args.share_size) if args.share_size else None
    if args.share:
        i, n = split.parse_share(args.share)
        done = split.run_array_task(job, i, n, share_bytes=share_bytes)
        if not args.quiet:
            _say(f"task {i}/{n}: wrote {len(done)} shares ({format_size(sum(d.bytes_written for d in done))}); run "
                 f"'shardconv finalize {args.dest}' once every task is done")
        return None
    client, close = split.client_for(args.scheduler) if args.scheduler else (None, lambda: None)
    try:
        return split.convert(job, workers=args.workers, client=client, overwrite=args.overwrite,
                             restart=args.restart, share_bytes=share_bytes, progress=not args.quiet)
    finally:
        close()


def _finalize(args: argparse.Namespace) -> int:
    from .api import finalize

    _report(args, finalize(args.dest, overwrite=args.overwrite))
    return 0


def _report(args: argparse.Namespace, r: Any) -> None:
    """A conversion's result: one JSON object on stdout with ``--json``, else a summary on stderr."""
    if args.json:
        import dataclasses

        _print_json({**dataclasses.asdict(r), "dest": str(r.dest),
                     "dropped": [{"name": n, "reason": why} for n, why in r.dropped]})
    elif not args.quiet:
        resumed = f", resumed {r.chunks_resumed} chunks" if r.chunks_resumed else ""
        _say(f"wrote {r.dest}: {r.tensors} tensors, {format_size(r.bytes_total)} in {r.seconds:.1f} s"
             f"{resumed}; {r.verified_units} source checksums verified")
        for line in _summarize_dropped(r.dropped):
            _say(f"  {line}")
        for note in r.notes:
            _say(f"  note: {note}")


def _print_json(obj: Any) -> None:
    """``obj`` as one JSON object on stdout."""
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _summarize_dropped(dropped: list[tuple[str, str]], limit: int = 8) -> list[str]:
    """One line per reason: how many tensors, and a few names."""
    by_reason: dict[str, list[str]] = {}
    for name, why in dropped:
        by_reason.setdefault(why, []).append(name)
    lines = []
    for why, names in by_reason.items():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        lines.append(f"left out {len(names)}: {why} ({shown})")
    return lines[:limit] + ([f"... and {len(lines) - limit} more reasons"] if len(lines) > limit else [])


def _sizes_by_name(infos: list[Any], wanted: set[str]) -> dict[str, int]:
    """The size of each tensor whose raw key or the name ``ls`` shows (what plans list) is one of
    ``wanted``, under that name (the shown name's where both are). Only those: a plan of 100 000
    tensors leaves out a few, and a dict of every name cost more than the rest of its totals."""
    from itertools import compress
    from operator import attrgetter, itemgetter

    from .mapping.roles import assign_roles

    nbytes = list(map(attrgetter("nbytes"), infos))
    keys = list(map(attrgetter("name"), infos))
    sizes = dict(compress(zip(keys, nbytes), map(wanted.__contains__, keys)))
    shown = list(map(itemgetter(1), assign_roles(infos)))
    sizes.update(compress(zip(shown, nbytes), map(wanted.__contains__, shown)))
    return sizes


@_gc_paused
def _plan(args: argparse.Namespace) -> int:
    from operator import attrgetter

    from .api import make_plan
    from .core.engine import memory_estimate
    from .core.plan import output_sizes
    from .mapping.roles import remembering
    from .sinks import require, sink_for

    with _open_src(args) as source, remembering():  # the planner's roles serve _sizes_by_name too
        sink = sink_for(getattr(args, "dest", "x"), args.to, **_sink_values(args))
        require(sink.name)  # a missing library is reported by plan as by convert
        plan = make_plan(source, _mapping_options(args)).leave_out(sink.leave_out)
        tensors = source.tensors()
        infos = dict(zip(map(attrgetter("name"), tensors), tensors))
        sizes = _sizes_by_name(list(infos.values()), {n for n, _ in plan.dropped}) if plan.dropped else {}
        est = memory_estimate(plan, sink, parse_size(args.max_memory))
        out_bytes = output_sizes(plan.outputs)  # each computed once: 100 000 outputs are common
        totals = {"tensors_in": len(infos), "tensors_out": len(plan.outputs),
                  "bytes_in": sum(map(attrgetter("nbytes"), infos.values())), "bytes_out": sum(out_bytes),
                  "bytes_dropped": sum(sizes.get(n, 0) for n, _ in plan.dropped)}
        if args.json:
            json.dump({"source": source.location, "format": source.format,
                       "outputs": [{**o.describe(), "nbytes": n} for o, n in zip(plan.outputs, out_bytes)],
                       "dropped": [{"name": n, "reason": r} for n, r in plan.dropped],
                       "notes": plan.notes, "totals": totals, "memory": est}, sys.stdout, indent=1)
            sys.stdout.write("\n")
            return 0
    sys.stdout.write(_plan_text(plan, out_bytes))
    print(f"\n{totals['tensors_out']} outputs, {format_size(totals['bytes_out'])} out; {totals['tensors_in']} tensors, "
          f"{format_size(totals['bytes_in'])} in; {len(plan.dropped)} left out ({format_size(totals['bytes_dropped'])})")
    for line in _summarize_dropped(plan.dropped, limit=50):
        print(one_line(f"  {line}"))
    for note in plan.notes:
        print(one_line(f"  note: {note}"))
    print(f"estimated peak memory within {args.max_memory}: {format_size(est['peak'])} "
          f"(libraries {format_size(est['baseline'])}, buffers {format_size(est['buffers'])} in "
          f"{format_size(est['chunk_bytes'])} chunks)")
    return 0


def _plan_text(plan: Any, out_bytes: list[int]) -> str:
    """``plan``'s table, one line per output (sizes in ``out_bytes``), written at once and built
    column by column like ``ls``'s."""
    from operator import attrgetter

    from .core.plan import Copy

    outputs = plan.outputs
    names = list(map(attrgetter("name"), outputs))
    producers = list(map(attrgetter("producer"), outputs))
    if set(map(type, producers)) <= {Copy}:  # nearly always: what each ``describe()`` would say
        origins = list(map(attrgetter("source"), producers))
    else:
        origins = list(map(_origin, producers))
    cols = list(zip(map(attrgetter("dtype"), outputs), map(attrgetter("shape"), outputs), out_bytes))
    rest = {c: f"  {c[0]:<9} {str(list(c[1])):<18} {format_size(c[2]):>10}  <- " for c in set(cols)}
    width = max(6, max(map(len, names), default=0))
    return _table([list(map(str.ljust, names, repeat(width))), list(map(rest.__getitem__, cols)), origins])


def _origin(producer: Any) -> str:
    """Where ``plan`` says an output comes from: its source tensors, and the operation if not a copy."""
    from .core.plan import Copy

    if type(producer) is Copy:
        return str(producer.source)
    d = producer.describe()
    origin = d.get("from") or ", ".join(sorted({p["from"] for p in d.get("pieces", [])}))
    return origin + ("" if d["op"] == "copy" else f" [{d['op']}]")


def _verify(args: argparse.Namespace) -> int:
    from .verification import verify

    r = verify(args.dest, args.src, max_memory=args.max_memory, progress=not args.quiet, step=args.step,
               mapping=_mapping_options(args))
    if args.json:
        _print_json(r)
    elif not args.quiet:
        against = f", {format_size(r['bytes_compared'])} compared with the source" if args.src else ""
        _say(f"ok: {r['tensors']} tensors, {r['checksums_verified']} checksums verified{against}")
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown command is a usage error that suggests the closest one (difflib)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in COMMANDS:
        return
    import difflib

    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    parser.error(f"unknown command {word!r} (choose from {', '.join(COMMANDS)}){hint}")


def main(argv: Sequence[str] | None = None) -> int:
    # shardconv does no linear algebra; NumPy's OpenBLAS would start (and spin) a thread per core.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_command(parser, argv)
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        if hasattr(signal, "SIGXFSZ"):
            # A file-size limit then fails the write with EFBIG (a clean error) instead of killing us.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    handler = {"ls": _ls, "plan": _plan, "convert": _convert, "verify": _verify,
               "finalize": _finalize}[args.command]
    try:
        with command_line():
            return handler(args)
    except ShardconvError as e:
        if args.debug:
            raise
        _say(f"shardconv: error: {e}")
        if args.command == "verify":  # as cmp and diff: 1 differs, 2 trouble
            return 1 if isinstance(e, VerifyError) else 2
        return e.exit_code
    except BrokenPipeError:  # the reader went away (``shardconv ls | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except Exception as e:
        if args.debug or args.command != "verify":
            raise
        _say(f"shardconv: error: {type(e).__name__}: {e}")
        return 2
    except KeyboardInterrupt as e:
        how = "interrupted (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        resume = "; rerun the same command to resume" if args.command == "convert" else ""
        _say(f"shardconv: {how}{resume}")
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())


#: Modules whose presence means exit must run the interpreter's teardown (atexit handlers that
#: stop clusters, worker processes or library threads).
_NEEDS_TEARDOWN = ("distributed", "multiprocessing", "tensorflow", "jax", "torch")


def run() -> None:
    """The ``shardconv`` command: ``main``, then exit. Where nothing needs the interpreter's
    teardown (freeing every object and module one by one: about 70 ms of CPU, a quarter of a small
    command), the process exits at once, its output flushed; otherwise it exits normally."""
    rc = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (``shardconv ls | head``)
        pass
    if (threading.active_count() == 1 and not any(m in sys.modules for m in _NEEDS_TEARDOWN)
            and sys.getprofile() is None and sys.gettrace() is None):  # a profiler writes its report at exit
        os._exit(rc)
    sys.exit(rc)
