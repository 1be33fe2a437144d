import json
import os
import subprocess
import sys

import numpy as np
import pytest

from framelm.pipeline import run_stage
from framelm.rundir import RunDir
from framelm.train import TrainConfig

from train.tiny_run import make_tiny_run

ARGS = dict(seq_len=32, global_batch_seqs=4, max_tokens=20 * 128, eval_every_steps=10, checkpoint_every_steps=10,
            heldout_max_tokens_per_set=300, device="cpu")


def losses(root) -> list[float]:
    lines = (root / "train" / "frame" / "seed0" / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


@pytest.mark.slow
def test_torchrun_two_ranks_matches_one_process(tmp_path):
    single = RunDir(make_tiny_run(tmp_path / "single"))
    run_stage("train", TrainConfig(**ARGS), single)
    ddp = make_tiny_run(tmp_path / "ddp")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "framelm", "train", "--run-dir", str(ddp), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(single.root), losses(ddp)
    assert len(a) == len(b) == 20
    # each rank reads half of every step's rows; the averaged gradients equal the full batch's
    assert np.allclose(a, b, rtol=1e-4)
    assert RunDir(ddp).record("train/frame/seed0")["status"] == "done"
    assert (ddp / "train" / "frame" / "seed0" / "hf" / "model.safetensors").is_file()
