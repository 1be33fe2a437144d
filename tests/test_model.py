import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import framelm.model
from framelm.config import ConfigError
from framelm.model import (PRESETS, FrameLM, ModelConfig, count_params, document_segments, flops_per_token,
                           next_token_loss, sdpa_takes_grouped_heads, segment_mask)

EOS = 0


def tiny(**overrides) -> FrameLM:
    torch.manual_seed(0)
    return FrameLM(ModelConfig(preset="tiny", **overrides).resolve(vocab_size=50))


@pytest.mark.parametrize("tie", [True, False])
def test_count_params_matches_the_module(tie):
    model = tiny(tie_embeddings=tie)
    assert count_params(model.args) == sum(p.numel() for p in model.parameters())
    assert count_params(model.args, embeddings=False) < count_params(model.args)


def test_presets_resolve_to_known_sizes():
    smollm = ModelConfig(preset="smollm-135m").resolve(49152)
    assert 134e6 < count_params(smollm) < 135e6  # SmolLM-135M has 134.5 M parameters
    for name in PRESETS:
        args = ModelConfig(preset=name).resolve(1000)
        assert flops_per_token(args, 1024) > 6 * count_params(args, embeddings=False)
    assert count_params(ModelConfig(preset="tiny").resolve(1000), embeddings=True) < 300_000


def test_flops_per_token_by_hand():
    args = ModelConfig(preset="tiny").resolve(1000)  # d_model 64, 2 layers, 4 heads of 16, 2 kv heads, ffn 192
    layer = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 192 + 2 * 64  # wqkv, wo, SwiGLU, two norms
    params = 2 * layer + 64 + 1000 * 64  # final norm, output projection (tied: the embedding lookup is no matmul)
    assert flops_per_token(args, 256) == 6 * params + 12 * 2 * 64 * 256


@pytest.mark.parametrize("bad, match", [
    (dict(preset="gpt5"), "preset"),
    (dict(n_heads=3), "divisible"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=0), "d_model"),
    (dict(rope_theta=0.0), "'rope_theta' = 0.0 must be positive"),
    (dict(norm_eps=-1e-5), "'norm_eps' = -1e-05 must be positive"),
])
def test_bad_shapes_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(bad)


def test_document_mask_is_causal_and_block_diagonal():
    tokens = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9]])
    mask = segment_mask(document_segments(tokens, EOS))[0, 0]
    # The EOS at position 2 opens document 2 (positions 2-4); position 5 opens document 3.
    expected_doc = [0, 0, 1, 1, 1, 2, 2]
    for i in range(7):
        for j in range(7):
            assert bool(mask[i, j]) == (j <= i and expected_doc[i] == expected_doc[j])


def test_no_attention_across_documents():
    model = tiny().eval()
    tokens = torch.tensor([[3, 4, 5, 6, EOS, 7, 8, 9, 10, 11]])
    perturbed = tokens.clone()
    perturbed[0, :4] = torch.tensor([12, 13, 14, 15])  # change document 1 only
    with torch.no_grad():
        masked, masked_p = model(tokens, EOS), model(perturbed, EOS)
        plain, plain_p = model(tokens), model(perturbed)
    # Document 2 (from its opening EOS on) is unaffected with the mask, affected without it.
    assert torch.allclose(masked[0, 4:], masked_p[0, 4:], atol=1e-6)
    assert not torch.allclose(plain[0, 4:], plain_p[0, 4:], atol=1e-4)
    # RoPE is relative: document 2 alone, at position 0, gives the same logits.
    with torch.no_grad():
        alone = model(tokens[:, 4:], EOS)
    assert torch.allclose(masked[0, 4:], alone[0], atol=1e-5)


def test_grouped_heads_go_to_sdpa_only_where_a_fused_kernel_takes_them():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert sdpa_takes_grouped_heads(cpu, torch.float32) and sdpa_takes_grouped_heads(cuda, torch.bfloat16)
    assert sdpa_takes_grouped_heads(cuda, torch.float16)
    assert not sdpa_takes_grouped_heads(cuda, torch.float32)  # only the math kernel: (T, T) scores in memory


def test_expanded_key_value_heads_give_the_grouped_output(monkeypatch):
    """The plain causal path as it runs in fp32 on GPUs (k/v expanded to one head per query head)
    equals the grouped-heads path."""
    model = tiny().eval()
    tokens = torch.randint(1, 50, (2, 24))
    kv_heads = []

    def recording_sdpa(q, k, v, **kwargs):
        kv_heads.append(k.shape[1])
        return sdpa(q, k, v, **kwargs)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        grouped = model(tokens)
        monkeypatch.setattr(framelm.model, "sdpa_takes_grouped_heads", lambda device, dtype: False)
        expanded = model(tokens)
    n_layers = model.args.n_layers
    assert kv_heads == [model.args.n_kv_heads] * n_layers + [model.args.n_heads] * n_layers
    assert torch.allclose(grouped, expanded, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex attention runs unfused (eagerly) on the CPU
def test_flex_attention_matches_the_dense_mask():
    model = tiny().eval()
    tokens = torch.tensor([[3, 4, 5, 6, EOS, 7, 8, 9, 10, 11, EOS, 12, 13, 14, 15, 16]] * 2)
    tokens[1, 2] = EOS
    with torch.no_grad():
        dense = model(tokens, EOS)
        model.attention = "flex"
        flex = model(tokens, EOS)
    assert torch.allclose(dense, flex, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex attention runs unfused (eagerly) on the CPU
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_windows_with_their_own_positions_equal_separate_rows(attention):
    """Two windows in one row (positions restart at 0, segments by window) give the hidden states
    each window gives alone, whatever tokens they start with."""
    model = tiny().eval()
    model.attention = attention
    a, b = torch.randint(1, 50, (1, 7)), torch.randint(1, 50, (1, 9))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    segments = torch.cat([torch.zeros(7, dtype=torch.long), torch.ones(9, dtype=torch.long)]).unsqueeze(0)
    with torch.no_grad():
        packed = model.hidden_states(row, positions=positions, segments=segments)
        alone = torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1)
        unmasked = model.hidden_states(row, positions=positions)
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(unmasked[:, 7:], alone[:, 7:], atol=1e-3)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compiled_blocks_give_the_eager_hidden_states(attention):
    model = tiny().eval()
    model.attention = attention
    tokens = torch.randint(1, 50, (2, 32))
    segments = torch.zeros(2, 32, dtype=torch.long)
    segments[:, 5:], segments[1, 20:] = 1, 2
    with torch.no_grad():
        eager = [model.hidden_states(tokens, segments=segments), model.hidden_states(tokens, segments=segments.flip(1))]
        model.compile_blocks()
        compiled = [model.hidden_states(tokens, segments=segments)]
        frames_compiled = counters["frames"]["total"]
        compiled.append(model.hidden_states(tokens, segments=segments.flip(1)))
    for a, b in zip(eager, compiled):  # the second mask must not reuse the first one's
        assert torch.allclose(a, b, atol=1e-5)
    # Nor recompile the blocks: the trainer builds a new mask (for flex: a new mask_mod closure) every batch.
    assert counters["frames"]["total"] == frames_compiled


def test_tied_weights_round_trip_through_weights():
    model, other = tiny(), tiny(init_std=0.5)
    state = model.weights()
    assert "lm_head.weight" not in state
    other.load_weights(state)
    assert other.lm_head.weight.data_ptr() == other.embed.weight.data_ptr()
    x = torch.randint(1, 50, (2, 16))
    assert torch.equal(model(x), other(x))
    with pytest.raises(ValueError, match="missing"):
        other.load_weights({k: v for k, v in state.items() if k != "norm.weight"})


def test_loss_ignores_minus_100_and_sequence_limit():
    model = tiny()
    x = torch.randint(1, 50, (2, 8))
    y = x.clone()
    y[:, -1] = -100
    logits = model(x)
    full = next_token_loss(logits[:, :-1], x[:, :-1])
    assert torch.allclose(next_token_loss(logits, y), full)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.args.max_seq_len + 1, dtype=torch.long))
