import json

import pytest
import torch

from framelm.model import FrameLM, ModelConfig
from framelm.train.hf_export import export_hf

from train.tiny_run import write_tokenizer

EOS = 0


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_the_export_with_equal_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    # GQA (4 query heads, 2 kv heads), non-default RoPE base and norm epsilon
    args = ModelConfig(preset="tiny", tie_embeddings=tie, rope_theta=5000.0, norm_eps=1e-6, init_std=0.2).resolve(64)
    model = FrameLM(args).eval()
    write_tokenizer(tmp_path / "tok")
    out = export_hf(model.weights(), args, tmp_path / "hf", EOS, tmp_path / "tok")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(1, 64, (2, 48))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(out).eos_token_id == EOS


def test_export_replaces_an_older_folder(tmp_path):
    args = ModelConfig(preset="tiny").resolve(64)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "stale.bin").write_text("old")
    export_hf(FrameLM(args).weights(), args, tmp_path / "hf", EOS)
    assert not (tmp_path / "hf" / "stale.bin").exists()
    assert (tmp_path / "hf" / "model.safetensors").is_file()
