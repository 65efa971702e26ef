"""Exception classes: every failure a user can act on is one of these.

The CLI prints ``str(error)`` on one line and exits non-zero; tracebacks only
with ``--debug``. Messages name the file and, where there is one, the tensor.
"""
from __future__ import annotations


class ShardconvError(Exception):
    """Base class of every error shardconv reports to a user."""

    exit_code = 1

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled as class + message, whatever the constructor takes: errors raised in a
        # worker process reach the coordinator as the same class with the same one line.
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


def _rebuild(cls: type[ShardconvError], message: str, state: dict[str, object]) -> ShardconvError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class UsageError(ShardconvError):
    """Bad arguments or options."""

    exit_code = 2


class SourceError(ShardconvError):
    """The input cannot be opened or listed (missing, wrong kind, unreadable)."""


class SourceChangedError(SourceError):
    """The input changed while it was being converted (its fingerprint differs from the start)."""


class FormatError(SourceError):
    """The input is malformed: bad magic, truncated, impossible header fields."""


class ChecksumError(FormatError):
    """Stored bytes do not match their recorded checksum."""


class UnsupportedError(ShardconvError):
    """Valid input that shardconv does not handle (yet): unknown dtype, big-endian data."""


class MissingDependencyError(ShardconvError):
    """A format's optional library is not installed."""

    def __init__(self, module: str, extra: str, what: str) -> None:
        super().__init__(
            f"{what} needs the '{module}' package: pip install 'shardconv[{extra}]'"
        )


class DestinationError(ShardconvError):
    """The destination exists, is locked by another run, or cannot be written."""


class DurabilityError(DestinationError):
    """fsync failed: what was written cannot be trusted, so the partial output is discarded."""


class ResumeError(DestinationError):
    """A partial output exists but cannot be resumed (source or options changed)."""


class PlanError(ShardconvError):
    """The mapping from source names to output tensors is invalid; lists every problem."""

    def __init__(self, problems: list[str], where: str | None = None) -> None:
        self.problems = list(problems)
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems in the plan: " + "; ".join(problems[:20])
        if where and not head.startswith(where):
            head = f"{where}: {head}"
        if len(problems) > 20:
            head += f"; ... and {len(problems) - 20} more"
        super().__init__(head)


class VerifyError(ShardconvError):
    """An output does not match its manifest or its source."""


class BudgetError(ShardconvError):
    """The memory budget is too small for the work asked."""


class WorkerError(ShardconvError):
    """A worker of a split conversion was lost (killed, out of memory) more often than retried."""
