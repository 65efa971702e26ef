"""Command line: ``shardconv ls | convert | verify``. Errors print one line; --debug shows tracebacks."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import __version__
from .errors import ShardconvError
from .units import format_size


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summaries")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardconv", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"shardconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ls", help="list tensors (name, dtype, shape, size) without reading values")
    p.add_argument("src")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--step", type=int, help="checkpoint step in a directory of several")
    _common(p)

    p = sub.add_parser("convert", help="convert a checkpoint, streaming within --max-memory")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--to", help="output format (default: from DEST's suffix)")
    p.add_argument("--max-memory", default="512MiB", help="bound on every buffer shardconv allocates (default 512MiB)")
    p.add_argument("--step", type=int, help="checkpoint step in a directory of several")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.add_argument("--restart", action="store_true", help="discard a partial output instead of resuming it")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip the final fsync (the rename stays atomic, but a power loss may lose the output)")
    _common(p)

    p = sub.add_parser("verify", help="re-read an output and check it against its checksums (and SRC)")
    p.add_argument("dest")
    p.add_argument("src", nargs="?")
    p.add_argument("--max-memory", default="512MiB")
    _common(p)
    return parser


def _ls(args: argparse.Namespace) -> int:
    from .api import list_tensors

    opts = {"step": args.step} if args.step is not None else {}
    tensors = list_tensors(args.src, **opts)
    if args.json:
        json.dump([{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes,
                    "checksum": t.checksum} for t in tensors], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max([len(t.name) for t in tensors] + [4])
    for t in tensors:
        print(f"{t.name:<{width}}  {t.dtype:<9} {str(list(t.shape)):<20} {format_size(t.nbytes):>10}")
    if not args.quiet:
        print(f"{len(tensors)} tensors, {format_size(sum(t.nbytes for t in tensors))}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .api import convert

    r = convert(args.src, args.dest, to=args.to, max_memory=args.max_memory, overwrite=args.overwrite,
                restart=args.restart, fsync=args.fsync, progress=not args.quiet, step=args.step)
    if not args.quiet:
        resumed = f", resumed {r.chunks_resumed} chunks" if r.chunks_resumed else ""
        print(f"wrote {r.dest}: {r.tensors} tensors, {format_size(r.bytes_total)} in {r.seconds:.1f} s"
              f"{resumed}; {r.verified_units} source checksums verified", file=sys.stderr)
        for name, why in r.dropped:
            print(f"  skipped {name}: {why}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .api import verify

    r = verify(args.dest, args.src, max_memory=args.max_memory)
    if not args.quiet:
        against = f", {format_size(r['bytes_compared'])} compared with the source" if args.src else ""
        print(f"ok: {r['tensors']} tensors, {r['checksums_verified']} checksums verified{against}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"ls": _ls, "convert": _convert, "verify": _verify}[args.command]
    try:
        return handler(args)
    except ShardconvError as e:
        if args.debug:
            raise
        print(f"shardconv: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("shardconv: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
