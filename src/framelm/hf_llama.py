"""framelm's decoder <-> Hugging Face Llama: the same network under other tensor names.

`export_hf` writes OUT/config.json (LlamaConfig), OUT/model.safetensors (HF tensor names; the
fused q/k/v and gate/up projections split back into HF's separate matrices) and a copy of the
tokenizer folder, so `AutoModelForCausalLM.from_pretrained(OUT)` gives the same logits as
framelm. The folder is built under a temporary name and renamed into place.

`framelm_from_hf` goes the other way, for the scorer: a loaded `LlamaForCausalLM` (a SmolLM,
a Llama, or a reference model framelm trained) becomes a `FrameLM` with the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.model import FrameLM, ModelArgs, rope_tables


def hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """framelm tensor names -> HF Llama names (tied embeddings: no lm_head.weight)."""
    hd = args.head_dim
    q_rows, kv_rows = args.n_heads * hd, args.n_kv_heads * hd
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not args.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(args.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.wqkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = state[src + "ffn.w_gate_up.weight"].chunk(2, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attn.wo.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "ffn.w_down.weight"],
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"],
        })
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def llama_config(args: ModelArgs, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, initializer_range=args.init_std,
        bos_token_id=eos_id, eos_token_id=eos_id, torch_dtype="float32",
    )


def export_hf(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: Path, eos_id: int,
              tokenizer_dir: Path | None = None) -> Path:
    """Write an HF model folder at `out_dir` (replacing an older one) from a framelm state dict."""
    out_dir = Path(out_dir)
    with fsutil.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        llama_config(args, eos_id).save_pretrained(tmp)
        save_file(hf_state_dict(state, args), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for item in Path(tokenizer_dir).iterdir():
                if item.is_file() and item.name not in ("config.json", "model.safetensors"):
                    shutil.copy2(item, tmp / item.name)
            _eos_opens_documents(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
    return out_dir


def _eos_opens_documents(model_dir: Path) -> None:
    """Name the EOS token as the tokenizer's BOS: framelm trains on documents that each follow an
    EOS, so whoever prepends the tokenizer's BOS (the scorer, a harness) must prepend that."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            data = fsutil.read_json(path)
            if data.get("eos_token") and data.get("bos_token") != data["eos_token"]:
                data["bos_token"] = data["eos_token"]
                fsutil.write_json(path, data)


def llama_model_args(config) -> ModelArgs:
    """The framelm shape of a Hugging Face Llama config; FramelmError naming what does not fit."""
    unsupported = []
    if config.model_type != "llama":
        unsupported.append(f"model_type {config.model_type!r} (framelm's decoder is a Llama)")
    for name, plain in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1)):
        if getattr(config, name, plain) != plain:
            unsupported.append(f"{name} = {getattr(config, name)!r}")
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x has rope_theta and rope_scaling.
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default" if not getattr(config, "rope_scaling", None)
                                                        else config.rope_scaling.get("rope_type", "scaled"),
                                                        "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"RoPE scaling {rope.get('rope_type')!r}")
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if head_dim * n_heads != config.hidden_size:
        unsupported.append(f"head_dim {head_dim} x {n_heads} heads != hidden_size {config.hidden_size}")
    if unsupported:
        raise FramelmError("not a plain Llama: " + "; ".join(unsupported))
    return ModelArgs(vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
                     n_heads=n_heads, n_kv_heads=config.num_key_value_heads or n_heads,
                     ffn_hidden=config.intermediate_size, max_seq_len=config.max_position_embeddings,
                     rope_theta=float(rope["rope_theta"]), norm_eps=config.rms_norm_eps,
                     tie_embeddings=bool(config.tie_word_embeddings))


def framelm_from_hf(hf_model, attention: str = "sdpa") -> FrameLM:
    """A FrameLM with the weights of a loaded Hugging Face Llama model, on its device and dtype."""
    args = llama_model_args(hf_model.config)
    state = hf_model.state_dict()
    ours = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if not args.tie_embeddings:
        ours["lm_head.weight"] = state["lm_head.weight"]
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        ours.update({
            dst + "attn.wqkv.weight": torch.cat([state[attn + p + "_proj.weight"] for p in "qkv"]),
            dst + "attn.wo.weight": state[attn + "o_proj.weight"],
            dst + "ffn.w_gate_up.weight": torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]]),
            dst + "ffn.w_down.weight": state[mlp + "down_proj.weight"],
            dst + "attn_norm.weight": state[src + "input_layernorm.weight"],
            dst + "ffn_norm.weight": state[src + "post_attention_layernorm.weight"],
        })
    weight = state["model.embed_tokens.weight"]
    # Built on the meta device and given the Hugging Face tensors as its own: no random
    # initialisation and no second copy of the weights (an fp32 model would need twice the memory
    # of the bf16 one being converted). Only the RoPE tables, which are no weights, are computed.
    with torch.device("meta"):
        model = FrameLM(args, attention)
    model.load_weights(ours, assign=True)
    with torch.device(weight.device):
        model.rope_cos, model.rope_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    return model.to(dtype=weight.dtype).eval()
