"""Progress of long calls, and metaopt's messages on the console.

:class:`Progress` is the one progress facility of the project (meta-training, the comparison, the optimizer
pipeline): a bar on a terminal, a log line now and then through :mod:`logging` elsewhere (a notebook's
captured output, CI, a file), nothing when disabled (``progress=false``, or a process other than rank 0).

Library code only logs; whether the messages are shown is the application's choice. :func:`log_to_console`
is that choice in one line, and ``metaopt.run(...)`` makes it for the duration of the call when nothing else
has configured logging (:func:`console_by_default`), so a run from Python is not silent for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Iterator

__all__ = ["PACKAGES", "Progress", "console_by_default", "format_duration", "log_to_console"]

logger = logging.getLogger(__name__)

PACKAGES = ("metaopt", "optimizers", "hypernets")
"""The project's packages, whose loggers :func:`log_to_console` shows."""
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s`` or ``2h07m``: a duration as a person reads it in a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Progress of a loop of ``total`` units: a bar on a terminal, log lines elsewhere, nothing when disabled.

    Args:
        total: the units the loop does in all (steps, chunks of tasks, curves).
        desc: what the loop does, e.g. ``train transformer``; it starts every bar and log line.
        enabled: False shows nothing (``progress=false``, or not rank 0 of a distributed run).
        unit: the name of one unit (singular: ``step``).
        initial: the units done before (a resumed loop).
        every: seconds between log lines when there is no terminal for a bar; None: no automatic lines
            (the caller logs its own where ``logs`` is True, as the meta-trainer does at each validation).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0,
                 every: float | None = 30.0) -> None:
        from tqdm.auto import tqdm

        # disable=None: tqdm shows the bar only where its output is a terminal
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5,
                        disable=None if enabled else True)
        self.logs = enabled and bool(self.bar.disable)
        """Whether progress goes to log lines (enabled, but no terminal to draw a bar on)."""
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = self._start = initial
        self._started = self._logged = time.perf_counter()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` values (``loss=0.41``) are shown beside the count."""
        self.done += n
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)
        now = time.perf_counter()
        if self.logs and self.every is not None and now - self._logged >= self.every and self.done < self.total:
            self._logged = now
            logger.info("%s", self.line(postfix))

    def restart(self, done: int) -> None:
        """Set the count back to ``done`` units (a loop that rolled back to a checkpoint)."""
        self.bar.reset(total=self.total)
        self.bar.update(done)
        self.done = done

    def line(self, postfix: dict[str, Any] | None = None) -> str:
        """The progress as one line: count, share, time spent and the estimated time left."""
        elapsed = time.perf_counter() - self._started
        rate = (self.done - self._start) / elapsed if elapsed > 0 else 0.0
        left = f", ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {key} {value}" for key, value in (postfix or {}).items())
        return (f"{self.desc}: {self.done}/{self.total} {self._units(self.total)}{share}, {format_duration(elapsed)}"
                f"{left}{extra}")

    def _units(self, count: int) -> str:
        return self.unit if count == 1 else f"{self.unit}s"

    def close(self) -> None:
        """Remove the bar; without a terminal, log how long the loop took (unless ``every`` is None)."""
        self.bar.close()
        if self.logs and self.every is not None and self.done > self._start:
            elapsed = time.perf_counter() - self._started
            count = self.done - self._start
            logger.info("%s: %d %s in %s (%.1f %s/s)", self.desc, count, self._units(count), format_duration(elapsed),
                        count / max(elapsed, 1e-9), self._units(count))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger(PACKAGES[0]).handlers if getattr(h, "metaopt_console", False)]


def log_to_console(level: int | str = logging.INFO) -> logging.Handler:
    """Show the messages of metaopt (and of ``optimizers`` and ``hypernets``) at ``level`` and above on stderr.

    One line for a script or a notebook: progress, the run folder, each learner's settings, warnings.
    Calling it again changes the level; it never adds a second handler. Returns the handler (remove it from
    the loggers of :data:`PACKAGES` to stop).
    """
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        raise ValueError(f"log_to_console: level must be a logging level such as logging.INFO or 'DEBUG'; "
                         f"got {level!r}")
    existing = _handlers()
    handler = existing[0] if existing else logging.StreamHandler(sys.stderr)
    handler.metaopt_console = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.setLevel(level)
    for name in PACKAGES:
        package = logging.getLogger(name)
        package.setLevel(level)
        if handler not in package.handlers:
            package.addHandler(handler)
    return handler


@contextlib.contextmanager
def console_by_default() -> Iterator[None]:
    """:func:`log_to_console` at INFO for the duration, unless logging is configured already (a handler on the
    root logger or metaopt's, as the CLI, pytest or the user's own ``logging.basicConfig`` set)."""
    if logging.getLogger(PACKAGES[0]).hasHandlers():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in PACKAGES}
    handler = log_to_console(logging.INFO)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(level)
