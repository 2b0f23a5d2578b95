"""Progress on stderr for long work: a tqdm bar on a terminal, a periodic one-line summary elsewhere.

A bar's carriage-return redraws would fill a log file with hundreds of updates and glue the next
error message to the bar, so off a terminal (a log, a pipe) one line is printed every 10 % or every
``interval`` seconds instead.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Counts work done; ``update(n)`` after each step, ``close()`` at the end (or use it as a context)."""

    def __init__(self, description: str, total: Optional[int], unit: str = "frame", quiet: bool = False,
                 prefix: str = "vps", position: int = 0, interval: float = 30.0) -> None:
        from tqdm import tqdm

        self.description, self.total, self.unit = description, total, unit
        self.prefix, self.interval, self.quiet = prefix, interval, quiet
        self.done = 0
        self.start = self.last = time.monotonic()
        self.next_step = 1
        self.postfix = ""
        self.bar = None
        if not quiet and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            leave=False, position=position)

    def update(self, count: int = 1, postfix: str = "") -> None:
        self.done += count
        self.postfix = postfix
        if self.bar is not None:
            self.bar.update(count)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
        elif not self.quiet and (self._step_reached() or time.monotonic() - self.last >= self.interval):
            self._line()

    def _step_reached(self) -> bool:
        if not self.total or self.done * 10 < self.next_step * self.total:
            return False
        self.next_step = self.done * 10 // self.total + 1
        return True

    def _line(self) -> None:
        self.last = time.monotonic()
        rate = self.done / max(self.last - self.start, 1e-9)
        share = f"/{self.total} ({100 * self.done // self.total} %)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.prefix}: {self.description}: {self.done}{share}, {rate:.2f} {self.unit}/s{extra}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False clears the bar: what follows starts on a clean line

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
