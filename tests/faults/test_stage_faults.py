"""SIGKILL each long stage at seeded random points, restart it with the same command until it
completes, and compare with an uninterrupted run of the same command in another directory.

One tiny pipeline is built once (in-process, module scope); before each stage a snapshot of
the run directory is kept, and each stage's test copies that snapshot twice: one copy runs
uninterrupted (the reference), the other is killed and restarted.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from framelm.pipeline import build_config, run_stage
from framelm.rundir import RunDir

from .harness import assert_same_outputs, framelm_argv, kill_and_resume, run_uninterrupted

pytestmark = pytest.mark.slow

KILL_POINTS = 2
WORDS = ("the cat sat on a mat while numbers like 12 and 7 added up to more than anyone expected "
         "so the committee wrote letters about weather markets rivers engines and old novels").split()


def write_corpus(path: Path, n_docs: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n_docs):
            n_words = rng.choice([5, 15, 30, 60])
            text = " ".join(rng.choice(WORDS) for _ in range(n_words))
            fh.write(json.dumps({"id": f"doc-{i:05d}", "text": text, "source": ["web", "books", "math"][i % 3]}) + "\n")
    return path


class Pipeline:
    """Runs stages in one base directory and keeps a snapshot of it before each stage."""

    def __init__(self, root: Path, corpus: Path):
        self.root = root
        self.corpus = corpus
        self.base = RunDir(root / "base")
        self.snapshots: dict[str, Path] = {}

    def run(self, stage: str, **config) -> None:
        self.snapshots[stage] = self.root / f"before-{stage}"
        shutil.copytree(self.base.root, self.snapshots[stage])
        run_stage(stage, build_config(stage, config), self.base)

    def copies(self, stage: str, tmp_path: Path) -> tuple[Path, Path]:
        ref, run = tmp_path / "ref", tmp_path / "run"
        shutil.copytree(self.snapshots[stage], ref)
        shutil.copytree(self.snapshots[stage], run)
        return ref, run


# Each stage's settings: used in-process to build the pipeline and as CLI flags to re-run it.
CONFIGS: dict[str, dict] = {
    "ingest": {"docs_per_shard": 25, "source_field": "source"},
    "tokenizer": {"vocab_size": 320},
    "tokenize": {"num_workers": 1, "batch_docs": 16},
    "score": {"context_tokens": 64, "docs_per_shard": 50, "tokens_per_batch": 1024, "device": "cpu"},
    "partition": {"threads": 1},
    "schedule": {"seq_len": 64, "global_batch": 4},
    "export": {"formats": ["stream", "llmc"], "chunk_tokens": 20000, "llmc_shard_tokens": 30000, "threads": 1},
    "train": {"schedule": "frame", "seq_len": 64, "global_batch_seqs": 4, "max_tokens": 12800, "checkpoint_every_steps": 10,
              "eval_every_steps": 25, "heldout_max_tokens_per_set": 2000, "device": "cpu",
              "model": {"d_model": 32, "ffn_hidden": 64}},
}


def as_flags(config: dict, prefix: str = "") -> list[str]:
    """`--set key=value` for every (nested) setting, values written as YAML flow."""
    flags = []
    for key, value in config.items():
        if isinstance(value, dict):
            flags += as_flags(value, f"{prefix}{key}.")
        else:
            flags += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return flags


def make_reference_model(path: Path, tokenizer_dir: Path, seed: int, layers: int) -> Path:
    """A random tiny Llama reading the corpus tokenizer, saved as a local HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(tokenizer_dir, path)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"] if t["content"] not in vocab["model"]["vocab"])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "corpus.jsonl", 500)
    p = Pipeline(root, corpus)
    p.run("ingest", inputs=[str(corpus)], **CONFIGS["ingest"])
    p.run("tokenizer", **CONFIGS["tokenizer"])
    p.run("tokenize", **CONFIGS["tokenize"])
    tok_dir = p.base.path("tokenize", "tokenizer")
    weak, strong = (make_reference_model(root / name, tok_dir, seed, layers) for name, seed, layers in (("weak", 1, 1), ("strong", 2, 2)))
    CONFIGS["score"].update(weak_model=str(weak), strong_model=str(strong))
    for stage in ("score", "partition", "schedule", "export", "train"):
        p.run(stage, **CONFIGS[stage])
    return p


def fault_run(stage_words: list[str], ref: Path, run: Path, key: str, seed: int, *extra_flags: str,
              ignore=lambda rel: False) -> None:
    flags = [*extra_flags, *as_flags(CONFIGS[key.split("/")[0]])]
    work_s = run_uninterrupted(framelm_argv(stage_words, ref, *flags), ref)
    # A delay beyond a tenth of the stage's run time could outlast a fast stage on a fast machine.
    report = kill_and_resume(framelm_argv(stage_words, run, *flags), run, ref, seed=seed, kill_points=KILL_POINTS,
                             max_delay_s=min(0.2, work_s / 10))
    assert report.landed, f"no kill landed while {key} was working ({work_s:.2f}s uninterrupted): {report}"
    assert_same_outputs(run, ref, key, ignore)
    record = json.loads((run / "manifest.json").read_text())["stages"][key]
    assert record["status"] == "done"
    assert record["counts"] == json.loads((ref / "manifest.json").read_text())["stages"][key]["counts"]


def logged_results(log: Path) -> list[dict]:
    """The training log without its wall-clock fields (throughput, MFU), which no rerun repeats."""
    timing = ("tokens_per_s", "mfu", "seconds", "elapsed", "time")
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in timing)}
            for line in log.read_text().splitlines()]


def test_ingest_survives_kills(pipeline, tmp_path):
    ref, run = pipeline.copies("ingest", tmp_path)
    fault_run(["ingest"], ref, run, "ingest", 1, "--inputs", str(pipeline.corpus))


@pytest.mark.parametrize("stage, seed", [("tokenize", 2), ("score", 3), ("partition", 4), ("export", 5)])
def test_stage_survives_kills(pipeline, tmp_path, stage, seed):
    ref, run = pipeline.copies(stage, tmp_path)
    fault_run([stage], ref, run, stage, seed)


def test_train_survives_kills(pipeline, tmp_path):
    ref, run = pipeline.copies("train", tmp_path)
    key = "train/frame/seed0"
    fault_run(["train"], ref, run, key, 6, ignore=lambda rel: rel.name == "log.jsonl")
    got, want = logged_results(run / key / "log.jsonl"), logged_results(ref / key / "log.jsonl")
    assert [r["step"] for r in got if r["type"] == "train"] == list(range(1, 51)), "each step logged once"
    assert got == want
