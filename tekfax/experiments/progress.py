"""A minimal per-epoch progress bar on stderr (no tqdm).

On a terminal the bar is redrawn in place at most every ``interval`` seconds; otherwise (a
log file, a captured stream) only the finished epoch's line is written, once.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 20


class ProgressBar:
    """``label epoch e/E [#####-----] i/n loss 0.1234 acc 97.1% 1234 img/s [3 skipped]``.

    The skipped count (steps with a non-finite gradient, skipped by
    :func:`tekfax.skip_non_finite`) appears only when it is not zero.
    """

    def __init__(
        self,
        label: str,
        epoch: int,
        epochs: int,
        total: int,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float = 0.2,
    ) -> None:
        self.label, self.epoch, self.epochs, self.total = label, epoch, epochs, total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval
        self._last = -float("inf")

    def due(self) -> bool:
        """Whether a redraw is due now (callers fetch their running numbers only then)."""
        return self.live and time.perf_counter() - self._last >= self.interval

    def render(
        self,
        done: int,
        loss: float,
        accuracy: float | None,
        images_per_s: float,
        skipped: int = 0,
    ) -> str:
        """The bar's text for ``done`` of ``total`` batches (and skipped steps, if any)."""
        filled = _WIDTH * done // max(self.total, 1)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        acc = "" if accuracy is None else f" acc {100 * accuracy:5.1f}%"
        return (
            f"{self.label} epoch {self.epoch}/{self.epochs} [{bar}] {done}/{self.total} "
            f"loss {loss:.4f}{acc} {images_per_s:,.0f} img/s"
            + (f" {skipped} skipped" if skipped else "")
        )

    def update(
        self,
        done: int,
        loss: float,
        accuracy: float | None,
        images_per_s: float,
        skipped: int = 0,
    ) -> None:
        """Redraws the bar in place (terminals only)."""
        if not self.live:
            return
        self._last = time.perf_counter()
        text = self.render(done, loss, accuracy, images_per_s, skipped)
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()

    def close(
        self,
        done: int,
        loss: float,
        accuracy: float | None,
        images_per_s: float,
        note: str = "",
        skipped: int = 0,
    ) -> None:
        """Writes the epoch's final line and a newline."""
        if not self.enabled:
            return
        text = self.render(done, loss, accuracy, images_per_s, skipped)
        text += f" | {note}" if note else ""
        self.stream.write(
            ("\r" if self.live else "") + text + ("\x1b[K" if self.live else "") + "\n"
        )
        self.stream.flush()
