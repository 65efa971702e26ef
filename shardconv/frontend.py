"""How messages name an option: as a flag on the command line (``--overwrite``), as a keyword
argument from Python (``overwrite=True``). The CLI marks the commands it runs; everything else
is the Python API."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

_CLI = contextvars.ContextVar("shardconv_cli", default=False)

#: The mapping options, in the order messages and help list them (``convert``, ``plan`` and
#: ``verify`` take them all; a rules file's ``[options]`` takes those that are not files).
MAPPING_OPTIONS = ("rules", "preset", "prefer_ema", "drop_optimizer", "allow_unmapped", "names",
                   "include", "exclude", "dtype")


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Within this block, messages name options as command-line flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option(name: str, value: Any = True, *, placeholder: bool = False) -> str:
    """Option ``name`` (a keyword argument: ``drop_optimizer``) as the current front end spells
    it: ``--drop-optimizer``, ``--names keys`` on the command line; ``drop_optimizer=True``,
    ``names='keys'`` from Python. ``placeholder``: ``value`` is a stand-in (``N``), not quoted."""
    if _CLI.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is True else f"{flag} {value}"
    return f"{name}={value if placeholder else repr(value)}"


def options_list(names: tuple[str, ...] | list[str] = MAPPING_OPTIONS) -> str:
    """``names`` as the current front end spells them, comma-separated, without values."""
    if _CLI.get():
        return ", ".join("--" + n.replace("_", "-") for n in names)
    return ", ".join(f"{n}=" for n in names)
