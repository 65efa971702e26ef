"""How messages name an option: as a flag on the command line (``--overwrite``), as a keyword
argument from Python (``overwrite=True``). The CLI marks the commands it runs; everything else
is the Python API."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

#: The memory bound of a conversion or verify when none is given (``api.DEFAULT_MAX_MEMORY``).
DEFAULT_MAX_MEMORY = "512MiB"

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


def option_name(name: str) -> str:
    """Option ``name`` without a value: ``--drop-optimizer`` / ``drop_optimizer``."""
    return "--" + name.replace("_", "-") if _CLI.get() else name


def options_list(names: tuple[str, ...] | list[str] = MAPPING_OPTIONS) -> str:
    """``names`` as the current front end spells them, comma-separated, without values."""
    if _CLI.get():
        return ", ".join(map(option_name, names))
    return ", ".join(f"{n}=" for n in names)


def changed_options(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The options that differ between two runs, each named as the user gives it:
    ``--drop-optimizer None -> True`` (values shortened to a few dozen characters)."""
    def brief(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{option_name(k)} {brief(old.get(k))} -> {brief(new.get(k))}"
            for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
