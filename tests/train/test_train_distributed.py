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


# Each rank trains into its own folder, as ranks on nodes without a shared filesystem would see one run folder.
RANK_FOLDER_FIT = """
import os, sys
from pathlib import Path
import numpy as np
import torch
from framelm.train import TrainConfig, fit
from framelm.tokenstore import StageRange
torch.set_num_threads(1)
tokens = np.random.default_rng(0).integers(1, 64, 4 * 4 * 16 + 1).astype(np.uint16)
cfg = TrainConfig(seq_len=16, global_batch_seqs=4, eval_every_steps=0, checkpoint_every_steps=2, device="cpu")
fit(cfg, tokens, [StageRange("all", 0, len(tokens))], Path(sys.argv[1]) / f"rank{os.environ.get('RANK', '0')}",
    eos_id=0, vocab_size=64)
"""


@pytest.mark.slow
def test_ranks_that_see_different_checkpoints_refuse_to_resume(tmp_path):
    script = tmp_path / "fit_rank_folder.py"
    script.write_text(RANK_FOLDER_FIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert (tmp_path / "rank0" / "checkpoints" / "step-00000004").is_dir()  # rank 1's folder has none
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "from step 0 to step 4" in done.stderr and "filesystem shared by all ranks" in done.stderr, done.stderr[-3000:]
