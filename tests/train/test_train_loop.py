import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from framelm.errors import FramelmError
from framelm.model import flops_per_token
from framelm.pipeline import run_stage
from framelm.rundir import RunDir
from framelm.train import TrainConfig, fit, loop
from framelm.tokenstore import StageRange
from framelm.train.loop import gpu_peak_flops, peak_flops

from train.tiny_run import make_tiny_run

SMALL = dict(seq_len=32, global_batch_seqs=4, lr=3e-3, eval_every_steps=10, checkpoint_every_steps=10,
             heldout_max_tokens_per_set=2000)


def records(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def test_train_stage_learns_and_writes_the_contract_files(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run", tokenizer=True))
    cfg = TrainConfig(**SMALL, average="wma", average_last=2)
    counts = run_stage("train", cfg, run)
    out = run.path("train", "frame", "seed0")
    assert sorted(p.name for p in out.iterdir()) == [".framelm-hash", "checkpoints", "hf", "hf-avg", "log.jsonl"]
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    steps = counts["steps"]
    assert steps == 5477 // 128  # the whole stream of the tiny run, in steps of 4 x 32 tokens
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000040", f"step-{steps:08d}"]  # the last average_last checkpoints
    assert (out / "checkpoints" / ckpts[-1] / "trainer.pt").is_file()
    assert not (out / "checkpoints" / ckpts[0] / "trainer.pt").exists()
    from safetensors.torch import load_file

    final, averaged = load_file(str(out / "hf" / "model.safetensors")), load_file(str(out / "hf-avg" / "model.safetensors"))
    step40 = load_file(str(out / "checkpoints" / ckpts[0] / "model.safetensors"))
    # wma of two checkpoints: 1/3 of step 40 + 2/3 of the final step
    assert torch.allclose(averaged["model.norm.weight"], step40["norm.weight"] / 3 + 2 * final["model.norm.weight"] / 3, atol=1e-6)

    train = records(out / "log.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(r["tokens"] == r["step"] * 128 for r in train)
    assert set(train[0]) == {"type", "step", "tokens", "loss", "lr", "stage", "tokens_per_s", "mfu"}
    # stage Q1 holds stream tokens [0, 2569): steps whose first token lies there are Q1
    assert [r["stage"] for r in train] == ["Q1" if (r["step"] - 1) * 128 < 2569 else "Q3" for r in train]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 0.5

    heldout = records(out / "log.jsonl", "heldout")
    assert [r["step"] for r in heldout] == [10, 20, 30, 40, steps]
    assert set(heldout[0]["losses"]) == {"all", "source/alpha", "source/beta", "quadrant/Q1", "quadrant/Q3"}
    assert heldout[-1]["losses"]["all"] < heldout[0]["losses"]["all"]
    assert counts["final_heldout_loss"] == heldout[-1]["losses"]["all"]
    assert run.record("train/frame/seed0")["status"] == "done"


def _uninterrupted_and_killed(tmp_path: Path, cfg_args: dict) -> tuple[Path, Path]:
    """Run once straight through (in process) and once killed by SIGKILL mid-run then re-run."""
    straight = RunDir(make_tiny_run(tmp_path / "straight"))
    run_stage("train", TrainConfig(**cfg_args), straight)
    killed = make_tiny_run(tmp_path / "killed")
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from framelm.pipeline import run_stage\nfrom framelm.train import TrainConfig\n"
        f"run_stage('train', TrainConfig(**{cfg_args!r}), sys.argv[1])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], env=env)
    ckpt_dir = killed / "train" / "frame" / "seed0" / "checkpoints"
    deadline = time.time() + 120
    while not any(p.name >= "step-00000006" for p in ckpt_dir.glob("step-*")):
        assert proc.poll() is None, "the training subprocess ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "train" / "frame" / "seed0" / "hf").exists()  # really killed mid-run
    run_stage("train", TrainConfig(**cfg_args), RunDir(killed))
    return straight.root, killed


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_losses(tmp_path):
    cfg_args = dict(seq_len=16, global_batch_seqs=2, max_tokens=60 * 32, lr=3e-3, eval_every_steps=25,
                    checkpoint_every_steps=3, heldout_max_tokens_per_set=300, device="cpu")  # exact on CPU
    straight, killed = _uninterrupted_and_killed(tmp_path, cfg_args)
    log_a = (straight / "train/frame/seed0/log.jsonl").read_text().splitlines()
    log_b = (killed / "train/frame/seed0/log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s", "mfu")} for l in lines]
    a, b = strip(log_a), strip(log_b)
    assert len(a) == len(b) == 60 + 3
    assert a == b  # every loss, lr, stage and held-out loss bit for bit
    weights = lambda root: (root / "train/frame/seed0/hf/model.safetensors").read_bytes()
    assert weights(straight) == weights(killed)


def _stream(n=2048, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, n).astype(np.uint16)
    tokens[::50] = 0
    return tokens, [StageRange("a", 0, n // 2), StageRange("b", n // 2, n)]


def test_refuses_to_resume_on_another_stream(tmp_path):
    cfg = TrainConfig(seq_len=16, global_batch_seqs=4, checkpoint_every_steps=5, eval_every_steps=0, max_tokens=640)
    tokens, stages = _stream()
    fit(cfg, tokens, stages, tmp_path / "out", eos_id=0, vocab_size=64)
    changed = tokens.copy()
    changed[7] = 5 if changed[7] != 5 else 6
    with pytest.raises(FramelmError, match="another token stream"):
        fit(cfg, changed, stages, tmp_path / "out", eos_id=0, vocab_size=64)
    with pytest.raises(FramelmError, match="another training config"):
        fit(dataclasses.replace(cfg, lr=1e-3), tokens, stages, tmp_path / "out", eos_id=0, vocab_size=64)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    tokens, stages = _stream()
    cfg = TrainConfig(seq_len=16, global_batch_seqs=4, max_tokens=64, eval_every_steps=0)
    with pytest.raises(FramelmError, match="token id 63, outside the vocabulary of 60"):
        fit(cfg, tokens, stages, tmp_path / "out", eos_id=0, vocab_size=60)


def test_an_interrupted_run_closes_its_progress_bar(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-run ends the bar's line, so that the CLI's "interrupted" message starts a line of its own."""
    from framelm.cli import main

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    real_lr_at = loop.lr_at

    def interrupt_at_step_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", interrupt_at_step_3)
    root = make_tiny_run(tmp_path / "run", tokenizer=True)
    assert main(["train", "--run-dir", str(root), "--set", "seq_len=16", "--set", "global_batch_seqs=4",
                 "--set", "max_tokens=512", "--set", "eval_every_steps=0", "--set", "device=cpu"]) == 130
    err = capsys.readouterr().err
    assert "3/8" in err and "\nframelm: interrupted; re-run the same command to resume" in err


def test_resuming_keeps_the_log_of_finished_steps_and_names_a_broken_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n{"type": "train", "step": 3}\n{"type": "tr')
    assert [r["step"] for r in loop.LogFile(log, resume_step=2, enabled=True).records] == [1, 2]  # cut-off line dropped
    assert log.read_text() == '{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n'
    log.write_text('{"type": "train", "step": 1}\n{"type": "tr\n{"type": "train", "step": 2}\n')
    with pytest.raises(FramelmError, match=r"log.jsonl: line 2: invalid JSON"):
        loop.LogFile(log, resume_step=2, enabled=True)
    assert "step\": 2" in log.read_text()  # nothing is cut away


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    tokens, stages = _stream()
    losses = {}
    for micro, clip in ((0, 0.0), (2, 0.0), (0, 0.05), (2, 0.05)):
        # a large epsilon makes AdamW's update depend on the gradient's scale, so a mis-scaled
        # accumulated gradient changes the losses (with eps=1e-8 Adam would hide it); unclipped,
        # as clipping hides a wrong scale too; clipped, to show the clip acts on the whole step
        cfg = TrainConfig(seq_len=16, global_batch_seqs=4, micro_batch_seqs=micro, eval_every_steps=0, max_tokens=640,
                          device="cpu", adam_eps=1.0, grad_clip=clip, lr=1.0)
        fit(cfg, tokens, stages, tmp_path / f"m{micro}-{clip}", eos_id=0, vocab_size=64)
        losses[micro, clip] = [r["loss"] for r in records(tmp_path / f"m{micro}-{clip}" / "log.jsonl", "train")]
    assert len(losses[0, 0.0]) == 10
    assert np.allclose(losses[0, 0.0], losses[2, 0.0], rtol=1e-4)
    assert np.allclose(losses[0, 0.05], losses[2, 0.05], rtol=1e-4)
    assert not np.allclose(losses[0, 0.0], losses[0, 0.05], rtol=1e-3)  # the clip is active


def test_doc_masking_and_mfu_reach_the_log(tmp_path):
    tokens, stages = _stream()  # an EOS every 50 tokens, so the first step's rows hold document starts
    losses = {}
    for masking in (True, False):
        cfg = TrainConfig(seq_len=16, global_batch_seqs=4, eval_every_steps=0, max_tokens=128, device="cpu",
                          doc_masking=masking, peak_tflops=1e-3)
        fit(cfg, tokens, stages, tmp_path / f"mask-{masking}", eos_id=0, vocab_size=64)
        train = records(tmp_path / f"mask-{masking}" / "log.jsonl", "train")
        losses[masking] = train[0]["loss"]
        flops = flops_per_token(cfg.model.resolve(64), cfg.seq_len)
        for r in train:  # one rank: model FLOP/s over the given peak of 1e9
            assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e9, rel=1e-3)
    assert abs(losses[True] - losses[False]) > 1e-6  # the same weights see less context with the mask


@pytest.mark.parametrize("name, tflops", [("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362),
                                           ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA A10G", 70)])
def test_gpu_peak_flops_takes_the_most_specific_name(name, tflops, monkeypatch):
    # "L4" is also a substring of "NVIDIA L40": the answer must not hang on the table's order.
    assert gpu_peak_flops(name) == tflops * 1e12
    monkeypatch.setattr(loop, "GPU_PEAK_FLOPS", dict(reversed(loop.GPU_PEAK_FLOPS.items())))
    assert gpu_peak_flops(name) == tflops * 1e12


def test_peak_flops_prefers_the_given_peak_and_knows_no_cpu():
    assert peak_flops(torch.device("cpu"), peak_tflops=2.0) == 2e12
    assert peak_flops(torch.device("cpu")) is None
    assert gpu_peak_flops("Tesla T4") is None


def test_missing_export_names_the_schedule(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run"))
    with pytest.raises(FramelmError, match="no exported stream for schedule 'random'.*frame"):
        from framelm.train import train_model
        train_model(TrainConfig(schedule="random"), run)


def test_tensorboard_without_the_package_says_how_to_install(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    tokens, stages = _stream()
    cfg = TrainConfig(seq_len=16, global_batch_seqs=4, max_tokens=64, eval_every_steps=0, tensorboard=True)
    with pytest.raises(FramelmError, match="pip install tensorboard"):
        fit(cfg, tokens, stages, tmp_path / "out", eos_id=0, vocab_size=64)



def test_flex_attention_off_the_gpu_is_refused_before_training(tmp_path):
    tokens, stages = _stream()
    cfg = TrainConfig(seq_len=16, global_batch_seqs=4, max_tokens=64, eval_every_steps=0, attention="flex", device="cpu")
    with pytest.raises(FramelmError, match="attention = 'flex' trains only on CUDA"):
        fit(cfg, tokens, stages, tmp_path / "out", eos_id=0, vocab_size=64)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_matches_eager_and_keeps_the_weight_names(tmp_path):
    from safetensors.torch import load_file

    losses, heldout, weights = {}, {}, {}
    for compiled in (False, True):
        run = RunDir(make_tiny_run(tmp_path / f"run-{compiled}", tokenizer=True))
        # 10 steps; held-out sets at steps 5 and 10, whose last batches are partial (padded)
        cfg = TrainConfig(**{**SMALL, "eval_every_steps": 5}, max_tokens=10 * 128, device="cpu", compile=compiled)
        run_stage("train", cfg, run)
        out = run.path("train", "frame", "seed0")
        losses[compiled] = [r["loss"] for r in records(out / "log.jsonl", "train")]
        heldout[compiled] = [r["losses"] for r in records(out / "log.jsonl", "heldout")]
        weights[compiled] = load_file(str(out / "checkpoints" / "step-00000010" / "model.safetensors"))
    assert len(losses[True]) == 10 and len(heldout[True]) == 2
    assert np.allclose(losses[False], losses[True], rtol=1e-4)  # fused kernels round differently
    for eager, fused in zip(heldout[False], heldout[True]):
        assert eager.keys() == fused.keys() and np.allclose(list(eager.values()), list(fused.values()), rtol=1e-4)
    assert weights[False].keys() == weights[True].keys()
