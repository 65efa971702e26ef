"""Directories of checkpoint steps (``ckpt/1234/``, ``checkpoint_1234/``, ``ckpt-1234/``):
finding the finished steps and choosing the latest or the one asked for.

Shared by the Orbax and t5x sources, whose trainers write one directory per step.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import SourceError
from ..frontend import option

STEP = re.compile(r"^(?:.*?[_-])?(\d+)$")  # "1234", "checkpoint_1234", "ckpt-1234"


def is_dir(p: Path) -> bool:
    """``p.is_dir()``, False where the file system refuses to say."""
    try:
        return p.is_dir()
    except OSError:
        return False


def steps(root: Path, is_checkpoint: Callable[[Path], bool]) -> dict[int, Path]:
    """Finished step directories under ``root`` by step number (temporary ones skipped)."""
    out: dict[int, Path] = {}
    try:
        children = sorted(root.iterdir())
    except OSError:
        return out
    for c in children:
        m = STEP.match(c.name)
        if m and "tmp" not in c.name and is_dir(c) and is_checkpoint(c):
            out.setdefault(int(m.group(1)), c)
    return out


def choose_step(root: Path, step: int | None, is_checkpoint: Callable[[Path], bool], kind: str) -> Path:
    """The checkpoint ``root`` names: itself, its latest step, or step ``step``.

    Raises:
        SourceError: ``root`` holds no such checkpoint, or ``step`` does not apply or exist.
    """
    if is_checkpoint(root):
        m = STEP.match(root.name)
        if step is not None and not (m and int(m.group(1)) == step):
            raise SourceError(f"{root}: is a single {kind} checkpoint, not a directory of steps; "
                              f"{option('step', step)} does not apply (point at its parent directory)")
        return root
    found = steps(root, is_checkpoint)
    if not found:
        raise SourceError(f"{root}: not a {kind} checkpoint and holds no step directories of one")
    if step is None:
        return found[max(found)]
    if step not in found:
        shown = ", ".join(map(str, sorted(found)[-10:]))
        raise SourceError(f"{root}: no step {step} (steps here: {shown})")
    return found[step]
