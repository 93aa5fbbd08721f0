"""Progress display (mpncov._progress): a tqdm bar on a terminal only; plain lines or
nothing elsewhere; a missing tqdm is a note on a terminal, never an error."""
import io
import sys

import pytest

from mpncov import _progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)     # `from tqdm import tqdm` raises ImportError
    monkeypatch.setattr(_progress, "_NOTED_MISSING", False)


def _drive(bar, n=3):
    for _ in range(n):
        bar.set_postfix(loss=0.5, refresh=False)
        bar.update()
    bar.close()


@pytest.mark.parametrize("stream, enabled", [(io.StringIO(), True), (FakeTerminal(), False)])
def test_no_bar_off_a_terminal_or_when_disabled(stream, enabled):
    bar = _progress.progress_bar(3, "ep", enabled=enabled, file=stream)
    assert bar.disable
    _drive(bar)
    assert stream.getvalue() == ""


def test_tqdm_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    term = FakeTerminal()
    bar = _progress.progress_bar(3, "ep", file=term)
    assert not bar.disable
    _drive(bar)
    text = term.getvalue()
    assert "\r" in text and "ep" in text and "3/3" in text and "loss=0.5" in text


def test_missing_tqdm_is_one_note_on_a_terminal(no_tqdm):
    term = FakeTerminal()
    for _ in range(2):
        bar = _progress.progress_bar(3, "ep", file=term)
        assert bar.disable
        _drive(bar)
    assert term.getvalue() == "note: no progress bar: tqdm is not installed (pip install tqdm)\n"
    log = io.StringIO()
    _progress.progress_bar(3, file=log)
    assert log.getvalue() == ""       # off a terminal there is nothing to miss


def _items(stream):
    prog = _progress.ItemProgress(2, "ops", file=stream)
    for label in ("covpool B=2", "sqrtm B=2"):
        prog.start(label)
        prog.advance()
    prog.close()
    return stream.getvalue()


def test_item_progress_lines_off_a_terminal():
    lines = _items(io.StringIO()).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[0/2, ") and lines[0].endswith("s] covpool B=2")
    assert lines[1].startswith("[1/2, ") and ", eta " in lines[1]
    assert lines[1].endswith("s] sqrtm B=2")


def test_item_progress_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    text = _items(FakeTerminal())
    assert "\r" in text and "2/2" in text and "sqrtm B=2" in text and "[0/2, " not in text


def test_item_progress_without_tqdm_on_a_terminal(no_tqdm):
    text = _items(FakeTerminal())
    assert text.startswith("note: no progress bar: tqdm is not installed")
    assert "] covpool B=2\n" in text and "] sqrtm B=2\n" in text and "\r" not in text
