import json

import pytest
import torch

from framelm.model import FrameLM, ModelConfig
from framelm.errors import FramelmError
from framelm.hf_llama import export_hf, framelm_from_hf

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


@pytest.mark.parametrize("tie", [True, False])
def test_a_transformers_llama_converts_to_framelm_with_equal_logits(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=2048, rope_theta=7000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, initializer_range=0.2)
    hf = LlamaForCausalLM(config).eval()
    ours = framelm_from_hf(hf)
    assert (ours.args.n_heads, ours.args.n_kv_heads, ours.args.rope_theta, ours.args.tie_embeddings) == (6, 2, 7000.0, tie)
    tokens = torch.randint(0, 80, (1, 2048))  # every position: the RoPE tables must agree to the end
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() < 1e-4
    # the weights are shared, not copied (only the fused projections are new tensors)
    assert ours.embed.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert ours.blocks[1].ffn.w_down.weight.data_ptr() == hf.model.layers[1].mlp.down_proj.weight.data_ptr()
    assert (ours.lm_head.weight is ours.embed.weight) == tie
    assert not any(p.is_meta for p in [*ours.parameters(), *ours.buffers()])


@pytest.mark.parametrize("change, named", [
    (dict(attention_bias=True), "attention_bias = True"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
])
def test_what_framelm_cannot_run_is_named(change, named):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, **change)
    with pytest.raises(FramelmError, match=f"not a plain Llama: {named}"):
        framelm_from_hf(LlamaForCausalLM(config))


def test_the_exported_tokenizer_opens_documents_with_eos_as_training_did(tmp_path):
    from transformers import AutoTokenizer

    from scoring.conftest import _tokenizer

    _tokenizer(tmp_path / "tok", 300, "<s>", "</s>")  # a BOS of its own, unused by framelm's training
    eos_id = AutoTokenizer.from_pretrained(tmp_path / "tok").eos_token_id
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").bos_token_id != eos_id
    args = ModelConfig(preset="tiny").resolve(300)
    out = export_hf(FrameLM(args).weights(), args, tmp_path / "hf", eos_id, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id == tok.eos_token_id == eos_id
