"""Progress as the caller asks for it: ``True`` a bar (``tqdm.auto``: a widget in a notebook, text
on a terminal), a callable ``progress(done_bytes, total_bytes)``, or ``False`` nothing. The engine
and ``verify`` report through ``start`` and never import tqdm unless a bar is asked for."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: What ``convert(progress=...)`` and ``verify(progress=...)`` accept.
ProgressArg = bool | None | Callable[[int, int], Any]


class _Callback:
    """Calls ``fn(done_bytes, total_bytes)`` at the start and after every piece."""

    def __init__(self, fn: Callable[[int, int], Any], total: int, initial: int) -> None:
        self.fn, self.total, self.done = fn, total, initial
        fn(initial, total)

    def update(self, n: int) -> None:
        self.done += n
        self.fn(self.done, self.total)

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar whose rate (and so its ETA) is measured from the end of the first piece: that
    piece carries the start-up (threads, first reads, a resumed run's checks), and an ETA from
    it alone says hours for a job of seconds. A resumed run's ``initial`` bytes count as done,
    never as speed."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        dynamic_ncols=True, leave=True)
        self.warm = False

    def update(self, n: int) -> None:
        if self.warm:
            self.bar.update(n)
            return
        self.warm = True
        bar = self.bar
        bar.n += n
        bar.last_print_n = bar.initial = bar.n  # the first piece is progress, not speed
        bar.last_print_t = bar._time()
        bar.refresh()

    def close(self) -> None:
        self.bar.close()


def start(progress: ProgressArg, total: int, initial: int = 0, desc: str = "") -> _Bar | _Callback | None:
    """The reporter ``progress`` asks for (``update(n)``, ``close()``), or None."""
    if callable(progress):
        return _Callback(progress, total, initial)
    if progress:
        return _Bar(total, initial, desc)
    return None
