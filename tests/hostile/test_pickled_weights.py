"""A model folder whose only weights are a pickle that runs a command when unpickled:
`framelm score` and `framelm eval` must refuse it with a clean error and never unpickle it."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from .conftest import assert_user_error
from .test_tokenize_hostile import byte_bpe_tokenizer, ingest


class RunsACommand:
    """Unpickling this object runs `touch marker`: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_model_dir(path: Path, tokenizer_dir: Path, marker: Path) -> Path:
    from transformers import LlamaConfig

    shutil.copytree(tokenizer_dir, path)
    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(path)
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(RunsACommand(marker)))
    return path


def test_score_and_eval_refuse_pickled_weights(framelm_cli, tmp_path):
    marker = tmp_path / "code-ran"
    tok_dir = byte_bpe_tokenizer(tmp_path / "tok")
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}')
    model = pickled_model_dir(tmp_path / "model", tok_dir, marker)
    run = tmp_path / "run"
    ingest(framelm_cli, run, [{"id": "a", "text": "the quick brown fox"}, {"id": "b", "text": "jumps over the lazy dog"}])
    assert framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", tok_dir, "--num-workers", "1").code == 0
    result = framelm_cli("score", "--run-dir", run, "--quiet", "--weak-model", model, "--strong-model", model, "--device", "cpu")
    assert_user_error(result, str(model), "safetensors")
    assert not marker.exists(), "framelm unpickled a model file: arbitrary code ran"
    assert not (run / "score" / "scores.parquet").exists()
    result = framelm_cli("eval", "--run-dir", run, "--quiet", "--model", model, "--device", "cpu")
    assert_user_error(result, str(model), "safetensors")
    assert not marker.exists(), "framelm unpickled a model file: arbitrary code ran"

    pickle.loads((model / "pytorch_model.bin").read_bytes())  # control: the file really runs code
    assert marker.exists()
