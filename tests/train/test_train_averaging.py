import re

import pytest
import torch
from safetensors.torch import save_file

from framelm.errors import FramelmError
from framelm.train.averaging import average_checkpoints, averaging_weights


def test_weights_match_hand_computation():
    assert averaging_weights(4, "sma") == pytest.approx([0.25] * 4)
    assert averaging_weights(3, "wma") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    d = 0.6  # avg1 = t1; avg2 = .6 t1 + .4 t2; avg3 = .36 t1 + .24 t2 + .4 t3
    assert averaging_weights(3, "ema", d) == pytest.approx([0.36, 0.24, 0.4])
    for method in ("sma", "wma", "ema"):
        assert sum(averaging_weights(5, method, 0.3)) == pytest.approx(1.0)


def test_average_checkpoints_matches_the_recursion(tmp_path):
    thetas = [torch.randn(3, 2) for _ in range(3)]
    files = []
    for i, t in enumerate(thetas):
        files.append(tmp_path / f"{i}.safetensors")
        save_file({"w": t, "b": t[0].clone()}, str(files[-1]))
    d = 0.7
    ema = thetas[0]
    for t in thetas[1:]:
        ema = d * ema + (1 - d) * t
    result = average_checkpoints(files, "ema", d)
    assert torch.allclose(result["w"], ema, atol=1e-6)
    assert torch.allclose(result["b"], ema[0], atol=1e-6)
    assert result["w"].dtype == torch.float32
    wma = (1 * thetas[0] + 2 * thetas[1] + 3 * thetas[2]) / 6
    assert torch.allclose(average_checkpoints(files, "wma")["w"], wma, atol=1e-6)
    sma = sum(thetas) / 3
    assert torch.allclose(average_checkpoints(files, "sma")["w"], sma, atol=1e-6)


@pytest.mark.parametrize("later, problem", [
    ({"w": torch.zeros(3, 2)}, "lacks tensor 'b'"),
    ({"w": torch.zeros(3, 2), "b": torch.zeros(2), "extra": torch.zeros(1)}, "has tensor 'extra'"),
    ({"w": torch.zeros(1, 2), "b": torch.zeros(2)}, r"has tensor 'w' of shape \(1, 2\)"),  # would broadcast
])
def test_checkpoints_of_another_model_are_named(tmp_path, later, problem):
    first, second = tmp_path / "0.safetensors", tmp_path / "1.safetensors"
    save_file({"w": torch.ones(3, 2), "b": torch.ones(2)}, str(first))
    save_file(later, str(second))
    with pytest.raises(FramelmError, match=f"{re.escape(str(second))}.* {problem}"):
        average_checkpoints([first, second], "sma")
