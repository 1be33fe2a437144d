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
