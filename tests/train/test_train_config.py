import pytest

from framelm.config import ConfigError
from framelm.train import TrainConfig


@pytest.mark.parametrize("bad, match", [
    (dict(grad_clip=-1.0), "'grad_clip' = -1.0 must not be negative"),
    (dict(weight_decay=-0.1), "'weight_decay' = -0.1 must not be negative"),
    (dict(device="cuda:x"), "'device' = 'cuda:x'"),
    (dict(device="gpu"), "'device' = 'gpu'"),
])
def test_bad_values_are_named_with_their_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(bad)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_names_are_accepted(device):
    TrainConfig.from_dict({"device": device})


def test_torchrun_ranks_are_a_distributed_run_to_the_stage_runner(monkeypatch, tmp_path):
    from framelm import pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = TrainConfig()
    assert cfg.world_size == 2 and cfg.lock_name("train/frame/seed0") == "train/frame/seed0/rank1"
    with pytest.raises(Exception, match="--force cannot be given to the 2 ranks"):
        pipeline.run_stage("train", cfg, tmp_path, force=True)
