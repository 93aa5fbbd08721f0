"""Progress display for the benchmark and the training example: tqdm on a terminal.

tqdm is optional (the ``bench`` and ``train`` extras install it). A bar is shown only
when it is enabled, its stream is a terminal and tqdm is installed. Otherwise a stand-in
with the same methods does nothing: a log file or CI output gets no carriage-return
redraws, and a missing tqdm never stops a run (on a terminal, one note says that the bar
needs tqdm). What the caller prints itself (epoch summaries, the benchmark's per-item
lines of :class:`ItemProgress`) is unaffected.
"""
from __future__ import annotations

import sys
import time

_NOTED_MISSING = False


class _NoBar:
    """What progress_bar returns when no bar is shown: tqdm's methods, doing nothing."""
    disable = True

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, desc: str = "", *, enabled: bool = True, file=None, **tqdm_kwargs):
    """A tqdm bar on `file` (default stderr), or a do-nothing stand-in (``.disable`` is True)
    when not enabled, when `file` is not a terminal, or when tqdm is not installed."""
    global _NOTED_MISSING
    file = sys.stderr if file is None else file
    if not (enabled and _is_terminal(file)):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        if not _NOTED_MISSING:
            _NOTED_MISSING = True
            print("note: no progress bar: tqdm is not installed (pip install tqdm)", file=file)
        return _NoBar()
    return tqdm(total=total, desc=desc, file=file, dynamic_ncols=True, **tqdm_kwargs)


class ItemProgress:
    """Progress over `total` items of a long run, each announced with :meth:`start`.

    On a terminal with tqdm: one bar whose postfix names the current item. Otherwise one
    plain line per item on `file` ("[3/20, 12s, eta 70s] label"), which reads well in log
    files and CI output and says which item was running if the run stops.
    """

    def __init__(self, total: int, desc: str = "", file=None):
        self.file = sys.stderr if file is None else file
        self.total, self.done = max(total, 1), 0
        self.t0 = time.perf_counter()
        self.bar = progress_bar(self.total, desc, file=self.file, unit="item")

    def start(self, label: str) -> None:
        if not self.bar.disable:
            self.bar.set_postfix_str(label)
            return
        elapsed = time.perf_counter() - self.t0
        eta = f", eta {elapsed / self.done * (self.total - self.done):.0f}s" if self.done else ""
        print(f"[{self.done}/{self.total}, {elapsed:.0f}s{eta}] {label}", file=self.file,
              flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
