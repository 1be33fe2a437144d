import pytest

from framelm import launcher
from framelm.cli import main
from framelm.errors import FramelmError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_the_world_is_one_process(env):
    assert (launcher.rank(), launcher.world_size(), launcher.local_rank(), launcher.local_world_size()) == (0, 1, 0, 1)


def test_torchrun_values_are_read(env):
    for name, value in zip(TORCHRUN_VARS, ("5", "8", "1", "4")):
        env.setenv(name, value)
    assert (launcher.rank(), launcher.world_size(), launcher.local_rank(), launcher.local_world_size()) == (5, 8, 1, 4)


def test_an_empty_value_is_unset_and_one_machine_has_the_whole_world(env):
    env.setenv("RANK", "")
    env.setenv("WORLD_SIZE", "3")
    assert launcher.rank() == 0
    assert launcher.local_world_size() == 3


@pytest.mark.parametrize("name", TORCHRUN_VARS)
def test_a_value_that_is_not_an_integer_is_named(env, name):
    env.setenv(name, "two")
    read = {"RANK": launcher.rank, "WORLD_SIZE": launcher.world_size, "LOCAL_RANK": launcher.local_rank,
            "LOCAL_WORLD_SIZE": launcher.local_world_size}[name]
    with pytest.raises(FramelmError, match=f"environment variable {name} = 'two' must be an integer"):
        read()


def test_the_cli_reports_a_bad_world_size_without_a_traceback(env, tmp_path, capsys):
    env.setenv("WORLD_SIZE", "x")
    assert main(["ingest", "--run-dir", str(tmp_path / "run")]) == 2
    assert "framelm: error: environment variable WORLD_SIZE = 'x'" in capsys.readouterr().err


def test_a_stage_whose_defaults_read_the_environment_reports_it_too(env, capsys):
    env.setenv("WORLD_SIZE", "x")  # score's rank and world_size default to torchrun's, shown in --help
    assert main(["score", "--help"]) == 2
    assert "framelm: error: environment variable WORLD_SIZE = 'x'" in capsys.readouterr().err
