"""Every stage's command builds its flags from its config and explains itself with --help."""

import pytest

from framelm.cli import main
from framelm.stages import STAGES


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_working_help(stage, capsys):
    words = list(STAGES[stage].words)
    with pytest.raises(SystemExit) as exc:
        main(words + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--run-dir" in out and "--dry-run" in out and "(default:" in out


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text('{"body": "hello"}\n')
    run_dir = tmp_path / "run"
    assert main(["ingest", "--run-dir", str(run_dir), "--inputs", str(data), "--text-field", "body", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run" in out and "text_field: body" in out and f"- {data}" in out
    assert not (run_dir / "ingest").exists()


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["ingest", "--run-dir", str(tmp_path), "--set", "ingest.text_feild=x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("framelm: error:") and "did you mean 'text_field'" in err and "Traceback" not in err
