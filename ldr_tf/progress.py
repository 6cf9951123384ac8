"""Progress bars that suit both a terminal and a log file.

On a terminal `Progress` is Keras' bar (redrawn in place). When output goes to a file or a CI log it prints one
plain line at most every `interval` seconds (and at the end) instead of thousands of carriage returns:
``[train] 120/600 (20%) 2.41 it/s, eta 3m19s - loss 0.1234 - dice 0.61``.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt_time(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """A progress display for `total` units of work.

    Args:
      total: number of units (steps, pairs, subjects).
      label: short name printed in plain mode.
      unit: unit name for Keras' bar (e.g. "step", "pair").
      enabled: False disables all output.
      interval: seconds between plain-mode lines.
      stream: where to write (default stdout); the mode is chosen by ``stream.isatty()``.
    """

    def __init__(self, total: int, label: str = "", unit: str = "step", enabled: bool = True,
                 interval: float = 10.0, stream=None):
        self.total = int(total)
        self.label = label
        self.enabled = enabled
        self.interval = interval
        self.stream = stream or sys.stdout
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if enabled and self._tty:
            import keras

            self._bar = keras.utils.Progbar(self.total, unit_name=unit)
        self._t0 = time.perf_counter()
        self._start = None
        self._last_print = 0.0

    def update(self, current: int, values=None) -> None:
        """Reports that `current` units are done; `values` is a list of ``(name, number)``."""
        if not self.enabled:
            return
        values = list(values or [])
        if self._bar is not None:
            self._bar.update(current, values)
            return
        now = time.perf_counter()
        if self._start is None:  # rates count from the first update (a resumed run starts mid-way)
            self._start = (current, now)
            if current < self.total:
                return
        done = current >= self.total
        if not done and now - self._last_print < self.interval:
            return
        self._last_print = now
        n0, t0 = self._start
        rate = (current - n0) / max(now - t0, 1e-9)
        eta = (self.total - current) / rate if rate > 0 else float("inf")
        parts = [f"[{self.label}] {current}/{self.total} ({100.0 * current / max(self.total, 1):.0f}%)"]
        if current > n0:
            parts.append(f"{rate:.2f} it/s" + ("" if done else f", eta {_fmt_time(eta)}"))
        if done:
            parts.append(f"{_fmt_time(now - self._t0)} total")
        line = ", ".join(parts)
        for k, v in values:
            line += f" - {k} {v:.4g}" if isinstance(v, (int, float)) else f" - {k} {v}"
        print(line, file=self.stream, flush=True)
