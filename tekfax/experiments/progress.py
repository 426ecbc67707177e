"""The per-epoch progress bar of ``tekfax-compare``, drawn by tqdm on stderr.

On a terminal tqdm redraws the bar in place at most every ``interval`` seconds; on any other
stream (a log file, a captured stream) nothing is drawn while the epoch runs and only the
finished epoch's line is written, once, in the same format.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

BAR_FORMAT = "{desc} [{bar:20}] {n_fmt}/{total_fmt} {stats}"
BAR_CHARS = "-#"  # tqdm's ascii bar: empty, then full


class _EpochBar(tqdm):
    """tqdm with a ``{stats}`` field (loss, accuracy, speed) in its ``bar_format``."""

    stats = ""

    @property
    def format_dict(self):
        return {**super().format_dict, "stats": self.stats}


def _stats(loss: float, accuracy: float | None, images_per_s: float, skipped: int) -> str:
    acc = "" if accuracy is None else f" acc {100 * accuracy:5.1f}%"
    text = f"loss {loss:.4f}{acc} {images_per_s:,.0f} img/s"
    return text + (f" {skipped} skipped" if skipped else "")


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
        self.desc, self.total = f"{label} epoch {epoch}/{epochs}", total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval
        self._last = -float("inf")
        self._bar = None
        if self.live:
            self._bar = _EpochBar(
                total=total,
                desc=self.desc,
                file=self.stream,
                bar_format=BAR_FORMAT,
                ascii=BAR_CHARS,
                mininterval=interval,
                leave=True,
            )

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
        return tqdm.format_meter(
            done,
            self.total,
            0.0,
            prefix=self.desc,
            bar_format=BAR_FORMAT,
            ascii=BAR_CHARS,
            stats=_stats(loss, accuracy, images_per_s, skipped),
        )

    def _set(self, done: int, stats: str) -> None:
        self._bar.stats = stats
        self._bar.n = done

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
        self._set(done, _stats(loss, accuracy, images_per_s, skipped))
        self._bar.refresh()

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
        suffix = f" | {note}" if note else ""
        if self.live:
            self._set(done, _stats(loss, accuracy, images_per_s, skipped) + suffix)
            self._bar.close()  # draws the final state, then a newline
            return
        self.stream.write(self.render(done, loss, accuracy, images_per_s, skipped) + suffix + "\n")
        self.stream.flush()
