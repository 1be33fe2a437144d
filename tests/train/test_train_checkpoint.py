import pytest
import torch

from framelm.errors import FramelmError
from framelm.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint


def test_keeps_the_newest_and_optimizer_state_only_in_the_last(tmp_path):
    root = tmp_path / "checkpoints"
    rng_states = {}
    for step in (10, 20, 30):
        torch.rand(1)  # each checkpoint holds another RNG state
        rng_states[step] = torch.get_rng_state()
        model = {"w": torch.full((2, 2), float(step))}
        trainer = {"optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
                   "torch_rng": rng_states[step]}
        save_checkpoint(root, step, model, trainer, {"step": step}, keep=2)
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000020", "step-00000030"]
    assert not (root / "step-00000020" / "trainer.pt").exists()
    model, trainer, state = load_checkpoint(root / "step-00000030")
    assert state == {"step": 30} and torch.equal(model["w"], torch.full((2, 2), 30.0))
    assert trainer["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert float(trainer["optimizer"]["state"][0]["step"]) == 30.0
    assert torch.equal(trainer["torch_rng"], rng_states[30]) and not torch.equal(rng_states[20], rng_states[30])


def test_unfinished_folders_are_not_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, {"w": torch.zeros(1)}, {}, {"step": 5}, keep=1)
    (root / "step-00000010.tmp-123").mkdir()  # a save killed before its rename
    (root / "step-00000020").mkdir()  # no state.json: not a checkpoint
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000005"]


def test_an_unreadable_newest_state_says_to_start_over(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    for step in (5, 10):
        save_checkpoint(root, step, {"w": torch.zeros(1)}, {}, {"step": step}, keep=2)
    (root / "step-00000010" / "state.json").write_text("{")  # cut short by a crash
    with pytest.raises(FramelmError, match=f"delete {tmp_path / 'out'} .*to start over"):
        load_checkpoint(root / "step-00000010")
    # the older checkpoint is no way back: it kept weights only
    with pytest.raises(FramelmError, match="no trainer.pt"):
        load_checkpoint(root / "step-00000005")
