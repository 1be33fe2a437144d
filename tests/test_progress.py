import io

from framelm.progress import progress_bar, quiet, set_quiet


def shown(**kwargs) -> str:
    out = io.StringIO()
    for _ in progress_bar(range(3), desc="work", file=out, **kwargs):
        pass
    return out.getvalue()


def test_bars_show_unless_quiet_whatever_tqdm_read_when_imported(monkeypatch):
    import tqdm

    assert tqdm.__version__  # imported under the suite's TQDM_DISABLE=1, which tqdm read then

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not quiet()
    assert "work: 100%" in shown()
    assert shown(disable=True) == ""
    set_quiet()
    assert quiet() and shown() == ""


def test_an_empty_switch_shows_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "")
    assert "work: 100%" in shown()
