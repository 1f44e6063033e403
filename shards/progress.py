"""Progress of long jobs, readable wherever the output goes.

On a terminal: a tqdm bar. Anywhere else (CI, ``> log.txt``, a cluster job's log) tqdm would write
hundreds of carriage-return frames into one endless line; there a plain line is printed every
``every`` seconds instead (and a last one at the end), with the count, the rate and any note.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """``update(n)`` / ``note(text)`` / ``close()``; ``enabled=False`` prints nothing at all."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "img", enabled: bool = True,
                 every: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.count, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.enabled, self._note = enabled, ""
        self.terminal = enabled and self.stream.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                         file=self.stream) if self.terminal else None
        self._t0 = self._last = time.monotonic()
        self._start = initial

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every:
            self._line()

    def note(self, text: str) -> None:
        """A short status (e.g. ``3 rejected``) shown beside the count."""
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _line(self) -> None:
        self._last = now = time.monotonic()
        rate = (self.count - self._start) / max(now - self._t0, 1e-9)
        pct = f" ({100 * self.count / self.total:.1f}%)" if self.total else ""
        note = f", {self._note}" if self._note else ""
        print(f"{self.desc}: {self.count}/{self.total} {self.unit}{pct}, {rate:.0f} {self.unit}/s{note}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.count > self._start:
            self._line()
