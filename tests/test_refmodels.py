import json

import pyarrow.parquet as pq

import pytest
import torch

from framelm.config import ConfigError
from framelm.errors import FramelmError
from framelm.pipeline import run_stage
from framelm.refmodels import RefModelsConfig, ref_stream
from framelm.rundir import RunDir

from train.tiny_run import EOS, make_tiny_run

SMALL = dict(weak_preset="tiny", strong_preset="tiny", weak_tokens=1280, strong_tokens=3840, seq_len=32, global_batch_seqs=4,
             heldout_max_tokens_per_set=500)


def test_ref_stream_holds_exactly_the_ref_documents(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run"))
    stream, _ = ref_stream(run, seed=0, min_tokens=0)
    index = pq.read_table(run.path("tokenize", "index.parquet")).to_pandas()
    ref = index[index["split"] == "ref"]
    assert len(stream) == int(ref["n_tokens"].sum()) + len(ref)
    assert int((stream == EOS).sum()) == len(ref) and stream[-1] == EOS
    again, _ = ref_stream(run, seed=0, min_tokens=0)
    assert (again == stream).all()
    other, _ = ref_stream(run, seed=1, min_tokens=0)
    assert not (other == stream).all() and sorted(other) == sorted(stream)
    # a budget beyond the split repeats it, each epoch in a new order
    three, _ = ref_stream(run, seed=0, min_tokens=2 * len(stream) + 1)
    assert len(three) == 3 * len(stream)
    assert (three[: len(stream)] == stream).all() and not (three[len(stream): 2 * len(stream)] == stream).all()


@pytest.mark.slow
def test_refmodels_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    run = RunDir(make_tiny_run(tmp_path / "run", n_docs=200, tokenizer=True))
    counts = run_stage("refmodels", RefModelsConfig(**SMALL), run)
    assert counts["weak_tokens"] < counts["strong_tokens"]
    for name in ("weak", "strong"):
        folder = run.path("refmodels", name)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.vocab_size == 64
        # scored by default over the length it was trained on, not its preset's longest
        assert model.config.max_position_embeddings == SMALL["seq_len"]
        log = [json.loads(l) for l in (run.path("refmodels", "train", name) / "log.jsonl").read_text().splitlines()]
        assert log[-1]["type"] == "heldout"
    # both learned the synthetic sources; the strong one (4x the tokens) better
    assert counts["strong_heldout_loss"] < counts["weak_heldout_loss"] < 4.1


def test_config_and_data_errors(tmp_path):
    with pytest.raises(ConfigError, match="weak_preset"):
        RefModelsConfig.from_dict({"weak_preset": "huge"})
    with pytest.raises(ConfigError, match="'strong_tokens' = 100 is less than one step"):
        RefModelsConfig.from_dict({"strong_tokens": 100})
    root = make_tiny_run(tmp_path / "run")
    index = root / "tokenize" / "index.parquet"
    table = pq.read_table(index).to_pandas()
    table["split"] = table["split"].replace("ref", "train")
    table.to_parquet(index)
    with pytest.raises(FramelmError, match="no documents with split == 'ref'"):
        ref_stream(RunDir(root), seed=0, min_tokens=0)


@pytest.mark.parametrize("shift, message", [(10**9, "beyond tokens.bin"), (1, "not followed by EOS")])
def test_an_index_that_disagrees_with_the_token_store_is_named(tmp_path, shift, message):
    """Slicing tokens.bin past its end returns fewer tokens, silently: the ref stream must check."""
    root = make_tiny_run(tmp_path / "run")
    index = root / "tokenize" / "index.parquet"
    table = pq.read_table(index).to_pandas()
    first_ref = table.index[table["split"] == "ref"][0]
    table.loc[first_ref, "offset"] += shift
    table.to_parquet(index)
    with pytest.raises(FramelmError, match=rf"{index}: document '{table.loc[first_ref, 'id']}' .*{message}"):
        ref_stream(RunDir(root), seed=0, min_tokens=0)
