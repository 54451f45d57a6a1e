"""The one progress-bar helper (`advlab._progress`): tqdm with `disable=`, a clear error without tqdm."""

from __future__ import annotations

import sys

import pytest

from advlab._progress import progress_bar


def test_enabled_bar_is_tqdm_and_writes_to_stderr(capsys):
    from tqdm.auto import tqdm

    bar = progress_bar(total=3, enabled=True, desc="train", caller="train_run", unit="step")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.update(3)
    bar.set_postfix(loss="0.500")
    bar.close()
    err = capsys.readouterr().err
    assert "train" in err and "3/3" in err


def test_disabled_bar_is_tqdm_switched_off(capsys):
    from tqdm.auto import tqdm

    bar = progress_bar(total=3, enabled=False, desc="train", caller="train_run")
    assert isinstance(bar, tqdm) and bar.disable
    bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_without_tqdm_an_asked_for_bar_names_the_caller_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    expected = r"evaluate_robustness\(progress=True\).*pip install tqdm.*progress=False"
    with pytest.raises(ModuleNotFoundError, match=expected):
        progress_bar(total=1, enabled=True, desc="attack", caller="evaluate_robustness")


def test_without_tqdm_a_bar_not_asked_for_is_a_no_op(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = progress_bar(total=None, enabled=False, desc="attack", caller="evaluate_robustness")
    bar.update(1)
    bar.update()
    bar.set_postfix(loss="1")
    bar.close()
    assert capsys.readouterr() == ("", "")
