import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import framelm.heldout
from framelm.heldout import (HeldoutSet, document_windows, heldout_loss, heldout_sets, packed_rows, train_token_counts,
                            unigram_loss)
from framelm.model import FrameLM, ModelConfig
from framelm.rundir import RunDir

from train.tiny_run import EOS, VOCAB, make_tiny_run


def test_sets_per_source_and_quadrant(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run"))
    sets = heldout_sets(run, max_tokens_per_set=10_000)
    assert set(sets) == {"all", "source/alpha", "source/beta", "quadrant/Q1", "quadrant/Q3"}
    # every 5th document (i % 5 == 1) is held out: 24 of 120, half of them per source
    assert len(sets["all"].docs) == 24
    assert len(sets["source/alpha"].docs) == len(sets["source/beta"].docs) == 12
    assert sets["all"].n_tokens == sets["source/alpha"].n_tokens + sets["source/beta"].n_tokens
    assert sets["all"].n_bytes == 3 * sets["all"].n_tokens
    assert all(EOS not in d for d in sets["all"].docs)
    capped = heldout_sets(run, max_tokens_per_set=100)["all"]
    assert 100 <= capped.n_tokens < 100 + 120 and len(capped.docs) < 24


def test_without_a_partition_there_are_no_quadrant_sets(tmp_path):
    root = make_tiny_run(tmp_path / "run")
    (root / "partition" / "quadrants.parquet").unlink()
    assert set(heldout_sets(RunDir(root))) == {"all", "source/alpha", "source/beta"}


@pytest.mark.parametrize("batch_tokens", [1 << 24, 50])  # one bincount, or one per few documents
def test_train_token_counts_count_the_train_documents_only(tmp_path, monkeypatch, batch_tokens):
    monkeypatch.setattr(framelm.heldout, "UNIGRAM_BATCH_TOKENS", batch_tokens)
    run = RunDir(make_tiny_run(tmp_path / "run"))
    tokens = np.fromfile(run.path("tokenize", "tokens.bin"), dtype=np.uint16)
    index = pq.read_table(run.path("tokenize", "index.parquet")).to_pylist()
    expected = np.zeros(VOCAB, dtype=np.int64)
    for row in index:
        if row["split"] == "train":
            np.add.at(expected, tokens[row["offset"]: row["offset"] + row["n_tokens"]].astype(np.int64), 1)
    counts = train_token_counts(run)
    assert counts.tolist() == expected.tolist() and counts[EOS] == 0
    assert counts.sum() == sum(r["n_tokens"] for r in index if r["split"] == "train")
    # over the cap: whole train documents until it is passed, no more
    capped = train_token_counts(run, max_tokens=1000)
    longest = max(r["n_tokens"] for r in index)
    assert 1000 <= capped.sum() < 1000 + longest and (capped <= counts).all()


def test_unigram_loss_is_the_smoothed_frequencies_cross_entropy():
    counts = np.array([0, 3, 1, 0])  # add-one: p = (1, 4, 2, 1) / 8
    hset = HeldoutSet("all", [np.array([1, 1]), np.array([2, 3])], n_bytes=4)
    assert unigram_loss(counts, hset) == pytest.approx(-(2 * math.log(4 / 8) + math.log(2 / 8) + math.log(1 / 8)) / 4)


def test_an_untrained_model_is_above_the_unigram_floor(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run"))
    hset = heldout_sets(run)["all"]
    floor = unigram_loss(train_token_counts(run), hset)
    assert floor == pytest.approx(math.log(VOCAB - 1), abs=0.05)  # the chains visit the 63 non-EOS tokens about equally
    torch.manual_seed(0)
    untrained = FrameLM(ModelConfig(preset="tiny").resolve(VOCAB))
    assert heldout_loss(untrained, hset, EOS, seq_len=64)["loss"] > floor


def test_windows_read_each_document_after_an_eos():
    docs = [np.arange(1, 6), np.arange(10, 30)]
    windows = document_windows(docs, EOS, seq_len=8)
    assert [(d, x.tolist(), y.tolist()) for d, x, y in windows] == [
        (0, [EOS, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),  # a last window's last input predicts nothing
        (1, [EOS, *range(10, 17)], list(range(10, 18))),  # seq_len predictions per window
        (1, list(range(17, 25)), list(range(18, 26))),  # a later window sees only its own tokens
        (1, list(range(25, 30)), list(range(26, 30)))]


def test_packing_predicts_each_document_token_once():
    docs = [np.arange(1, 6), np.arange(10, 30), np.arange(40, 43)]
    inputs, targets = packed_rows(docs, EOS, seq_len=8)
    scored = targets[targets != -100]
    assert sorted(scored) == sorted(np.concatenate(docs))
    # the long document is cut into windows; the continuation window starts a row
    assert inputs.shape[1] == 8
    for x, y in zip(inputs, targets):
        for i in range(7):
            if y[i] != -100 and y[i + 1] != -100 and x[i + 1] != EOS:
                assert y[i] == x[i + 1]


def test_loss_and_bpb_do_not_depend_on_neighbours():
    torch.manual_seed(0)
    model = FrameLM(ModelConfig(preset="tiny").resolve(64))
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(1, 64, n) for n in (30, 50, 7))
    alone = heldout_loss(model, HeldoutSet("a", [a], 90), EOS, seq_len=64)
    together = heldout_loss(model, HeldoutSet("abc", [b, a, c], 0), EOS, seq_len=64)
    others = heldout_loss(model, HeldoutSet("bc", [b, c], 0), EOS, seq_len=64)
    # the summed NLL of a, b, c equals a's alone plus b's and c's
    total = together["loss"] * 87
    assert total == pytest.approx(alone["loss"] * 30 + others["loss"] * 57, rel=1e-5)
    assert alone["tokens"] == 30 and alone["bytes"] == 90
    assert alone["bpb"] == pytest.approx(alone["loss"] * 30 / math.log(2) / 90)
    # an untrained model is near uniform over the 64-token vocabulary
    assert abs(alone["loss"] - math.log(64)) < 0.5


def test_a_damaged_token_store_is_named(tmp_path):
    from framelm.errors import FramelmError
    from framelm.tokenstore import TokenStore

    root = make_tiny_run(tmp_path / "run")
    tokens_bin, meta_json = root / "tokenize" / "tokens.bin", root / "tokenize" / "meta.json"
    with open(tokens_bin, "ab") as fh:
        fh.write(b"\0")  # no longer a whole number of tokens
    with pytest.raises(FramelmError, match=f"{tokens_bin}: meta.json says n_tokens = .*re-run framelm tokenize --run-dir {root} --force"):
        TokenStore.open(RunDir(root))
    tokens_bin.unlink()
    with pytest.raises(FramelmError, match=f"{tokens_bin}: .*found no file"):
        TokenStore.open(RunDir(root))
    meta_json.write_text('{"dtype": "uint16",')
    with pytest.raises(FramelmError, match=f"{meta_json}: line 1, column .*: invalid JSON"):
        TokenStore.open(RunDir(root))
