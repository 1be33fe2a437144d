"""The proxy model: one Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).

`ModelConfig` is what a user writes (a named preset plus optional overrides); `resolve()` turns
it into `ModelArgs`, the concrete shape `FrameLM` is built from. The layout matches Hugging
Face's `LlamaForCausalLM` exactly (same RoPE convention, same norm placement), so
`framelm.hf_llama` only renames, splits and joins tensors. For speed on GPUs the query/key/value
projections and the SwiGLU gate/up projections are each one fused matmul.

Document masking: in a packed row `[.. doc1 .. EOS doc2 ..]` each token may attend only to
tokens of its own document. The EOS that ends a document opens the next one (it plays the role
of BOS), so the prediction of a document's first token depends on nothing before that EOS.
Plain causal rows go through `F.scaled_dot_product_attention`: on GPUs in bf16/fp16 the flash
kernel, which shares each key/value head among its query heads natively; on GPUs in fp32 the
memory-efficient kernel, with k/v expanded to one head per query head (it has no grouped-query
support, and the math kernel, which has, materialises the T x T scores); on the CPU its fused
kernel. Masked rows use, with `attention="sdpa"` (the default), SDPA with a (B, 1, T, T)
boolean block-diagonal mask (k/v expanded likewise), which runs on every device; with
`attention="flex"`, FlexAttention with a block-sparse mask that skips the blocks across
documents (compiled on GPUs; elsewhere eager, slow but exact, and forward only: torch has no
FlexAttention backward on the CPU). `hidden_states` also takes explicit RoPE positions and
segment numbers, which is how the scorer runs rows packed with windows that start mid-document.

Reads and writes no files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from framelm.config import ConfigError, StageConfig, field


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """A fully specified model shape."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# Shapes of well-known models (vocab_size comes from the tokenizer unless overridden).
PRESETS: dict[str, dict] = {
    # ~0.1 M non-embedding parameters (~0.2 M with a 1k vocabulary): unit tests on CPU.
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, max_seq_len=256),
    # ~0.4 M: the weak reference model on the demo corpus (CPU seconds).
    "nano": dict(d_model=96, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=256, max_seq_len=512),
    # ~2.4 M: the strong reference model on the demo corpus (CPU minute).
    "micro": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, ffn_hidden=512, max_seq_len=1024),
    # ~13 M: quick GPU proxy runs.
    "mini": dict(d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_hidden=1024, max_seq_len=2048),
    "smollm-135m": dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536, max_seq_len=2048),
    "smollm-360m": dict(d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_hidden=2560, max_seq_len=2048),
    "llama-1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, max_seq_len=2048,
                     rope_theta=500000.0),
}


@dataclasses.dataclass
class ModelConfig(StageConfig):
    """A model shape: a named preset, each field overridable (None = the preset's value)."""

    preset: str = field("tiny", help=f"named model shape: {', '.join(PRESETS)}")
    d_model: int | None = field(None, help="hidden size (None: from the preset)")
    n_layers: int | None = field(None, help="number of transformer blocks (None: from the preset)")
    n_heads: int | None = field(None, help="query heads (None: from the preset)")
    n_kv_heads: int | None = field(None, help="key/value heads for grouped-query attention; divides n_heads (None: from the preset)")
    ffn_hidden: int | None = field(None, help="SwiGLU hidden size (None: from the preset)")
    max_seq_len: int | None = field(None, help="longest sequence in tokens, recorded as max_position_embeddings (None: from the preset)")
    vocab_size: int | None = field(None, help="embedding rows (None: the tokenizer's vocabulary size)")
    rope_theta: float | None = field(None, help="RoPE base (None: from the preset, else 10000)")
    norm_eps: float = field(1e-5, help="RMSNorm epsilon")
    tie_embeddings: bool = field(True, help="share the input embedding and output projection weights")
    init_std: float = field(0.02, help="standard deviation of the normal weight initialisation")

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"'preset' = {self.preset!r} is not a known model; choose one of: {', '.join(PRESETS)}")
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "vocab_size",
                     "rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"'{name}' = {value} must be positive")
        shape = {**PRESETS[self.preset], **self._overrides()}
        if shape["d_model"] % shape["n_heads"]:
            raise ConfigError(f"'d_model' = {shape['d_model']} must be divisible by 'n_heads' = {shape['n_heads']}")
        if shape["n_heads"] % shape["n_kv_heads"]:
            raise ConfigError(f"'n_kv_heads' = {shape['n_kv_heads']} must divide 'n_heads' = {shape['n_heads']}")
        if (shape["d_model"] // shape["n_heads"]) % 2:
            raise ConfigError(f"head size d_model / n_heads = {shape['d_model'] // shape['n_heads']} must be even for RoPE")

    def _overrides(self) -> dict:
        names = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "rope_theta")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def resolve(self, vocab_size: int) -> ModelArgs:
        """The concrete shape; `vocab_size` is the tokenizer's unless the config overrides it."""
        self.validate()
        shape = {**PRESETS[self.preset], **self._overrides()}
        return ModelArgs(vocab_size=self.vocab_size or vocab_size, norm_eps=self.norm_eps,
                         tie_embeddings=self.tie_embeddings, init_std=self.init_std, **shape)


# -- building blocks -----------------------------------------------------------------------


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_seq_len, head_dim) in the rotate-half layout used by HF Llama.

    Computed in fp32 exactly as transformers computes them, so a model converted either way
    gives the same logits at every position, not only at the first few hundred.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.int64).float(), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D), or (B, 1, T, D) for per-row positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama does) so bf16 training and fp32 export agree.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # One matmul for q, k and v: rows [q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)].
        self.wqkv = nn.Linear(args.d_model, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None or isinstance(mask, torch.Tensor):  # plain causal, or (B, 1, T, T) bool, True = may attend
            y = sdpa_attention(q, k, v, mask)
        else:  # a FlexAttention BlockMask
            # v stays a strided view of the qkv matmul's output otherwise, and compiled flex
            # attention (torch 2.11-2.13, CPU inductor) reads such a view wrongly.
            y = flex_attention(q, k, v.contiguous(), mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def sdpa_takes_grouped_heads(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether plain causal SDPA on this device and dtype runs a fused kernel that shares each k/v
    head among a group of query heads: on the CPU, and on GPUs in fp16/bf16 (flash). On GPUs in
    fp32 only the math kernel does, and it materialises the (T, T) scores."""
    return device.type == "cpu" or dtype in (torch.float16, torch.bfloat16)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA of q (B, H, T, hd) over grouped k/v (B, KV, T, hd), with an optional (B, 1, T, T)
    bool mask (True = may attend) -> (B, H, T, hd).

    The memory-efficient kernel, the fused one for masked rows and for fp32 on GPUs, has no
    grouped-query support, so there k/v are expanded to one head per query head rather than
    fall back to the math kernel.
    """
    if mask is None and sdpa_takes_grouped_heads(q.device, q.dtype):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class SwiGLU(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_hidden = args.ffn_hidden
        self.w_gate_up = nn.Linear(args.d_model, 2 * args.ffn_hidden, bias=False)  # rows [gate | up]
        self.w_down = nn.Linear(args.ffn_hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.ffn = SwiGLU(args)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))


def document_segments(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) tokens -> (B, T) document numbers: the EOS tokens up to and including each
    position, so an EOS starts the next document."""
    return torch.cumsum(tokens == eos_id, dim=1)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment numbers -> (B, 1, T, T) bool mask: causal and block-diagonal over segments."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (B, T, T)
    return (same & causal).unsqueeze(1)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention with grouped-query heads: traced into the graph inside compiled blocks,
    compiled on its own on GPUs otherwise, eager (unfused) on the CPU."""
    if q.is_cuda and not torch.compiler.is_compiling():
        flex = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    return flex(q, k, v, block_mask=block_mask, enable_gqa=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


def segment_block_mask(segments: torch.Tensor):
    """The same mask as `segment_mask`, as a FlexAttention BlockMask (block-sparse)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_segment_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    B, T = segments.shape
    # Compiled on GPUs: built eagerly, the mask is materialised in full (B x T x T, int64
    # intermediates) for every batch.
    return create_block_mask(same_segment_causal, B, None, T, T, device=segments.device, _compile=segments.is_cuda)


class FrameLM(nn.Module):
    """Decoder-only transformer: embeddings -> n_layers blocks -> RMSNorm -> vocabulary logits."""

    def __init__(self, args: ModelArgs, attention: Literal["sdpa", "flex"] = "sdpa"):
        super().__init__()
        self.args = args
        self.attention = attention  # kernel for document-masked rows; see the module docstring
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.args.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                # Residual-branch outputs scaled down with depth (GPT-2 / nanoGPT).
                nn.init.normal_(p, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor, eos_id: int | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). With `eos_id`, attention stays inside documents."""
        segments = None if eos_id is None else document_segments(tokens, eos_id)
        return self.lm_head(self.hidden_states(tokens, segments=segments))

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, d_model), the output layer's input.

        positions (B, T): each token's RoPE position, below max_seq_len (default 0..T-1 in every
        row); segments (B, T): attention stays among equal numbers (default: plain causal).
        """
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's max_seq_len {self.args.max_seq_len}")
        if segments is None:
            mask = None
        elif self.attention == "flex":
            mask = segment_block_mask(segments)
        else:
            mask = segment_mask(segments)
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        x = self.embed(tokens)  # (B, T, d_model)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block in place (regional compilation, as torchtitan does).

        The blocks share one code path, so they share one compiled graph: a 30-layer model
        compiles in about the time of one block (10 s instead of 77 s for smollm-135m on a CPU),
        and the weights keep their names (no `_orig_mod.` prefix in checkpoints). Static shapes:
        callers keep to a few batch shapes (the trainer and the scorer pad to them), and a graph
        with symbolic shapes would be slower and, with FlexAttention, fails to build on the CPU.
        """
        for block in self.blocks:
            block.compile(dynamic=False)

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict with a tied output projection listed once (as embed.weight)."""
        state = self.state_dict()
        if self.args.tie_embeddings:
            del state["lm_head.weight"]
        return state

    def load_weights(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load a `weights()` dict; every tensor must be present (lm_head.weight only if untied).
        With `assign`, the tensors become the parameters (no copy: for a model built on the meta
        device), and tied weights are tied again."""
        result = self.load_state_dict(state, strict=False, assign=assign)
        if assign and self.args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        missing = [k for k in result.missing_keys if not (self.args.tie_embeddings and k == "lm_head.weight")]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights do not fit this model: missing {missing}, unexpected {result.unexpected_keys}")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of logits (B, T, V) against targets (B, T); -100 is ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def count_params(args: ModelArgs, embeddings: bool = True) -> int:
    """Parameters of a model of this shape (tied weights counted once)."""
    hd = args.head_dim
    attn = args.d_model * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * args.d_model
    ffn = 3 * args.d_model * args.ffn_hidden
    body = args.n_layers * (attn + ffn + 2 * args.d_model) + args.d_model
    if not embeddings:
        return body
    emb = args.vocab_size * args.d_model * (1 if args.tie_embeddings else 2)
    return body + emb


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for MFU, as in PaLM appendix B:
    6 x (parameters other than the input embedding, whose lookup is no matmul; the output
    projection counted even when tied) + 12 x layers x d_model x seq_len for causal attention
    scores, counted as if dense."""
    params = count_params(args, embeddings=False) + args.vocab_size * args.d_model
    return 6.0 * params + 12.0 * args.n_layers * args.d_model * seq_len
