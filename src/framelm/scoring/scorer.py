"""Summed negative log-likelihood of documents under reference causal language models.

`ReferenceModel` loads a local Hugging Face causal-LM directory (safetensors weights, its own
tokenizer) and runs it with one of two backends: `transformers`, the model as transformers
builds it (any causal LM), or `framelm`, a plain Llama (SmolLM, Llama, framelm's own reference
models) converted to framelm's decoder, whose fused projections and, on GPUs, compiled blocks
and block-sparse FlexAttention let it pack every row to the full window with one fixed batch
shape. `DocumentScorer` scores a list of texts under several such models: `prepare` tokenizes
and packs them (numpy only, safe to run on a background thread), `run` does the forward
passes. Full-vocabulary logits are never built for a whole batch: the scorer takes the final
hidden states of the positions that predict a token and applies the output layer to chunks of
them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from framelm.errors import FramelmError
from framelm.scoring.packing import PackedBatch, pack_documents


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


class ReferenceModel:
    """A causal LM and its tokenizer, loaded from a local directory."""

    def __init__(self, name: str, path: str | Path, *, device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                 max_window_tokens: int | None = None, stride_tokens: int | None = None,
                 backend: str = "transformers"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FramelmError(f"{name} model: {self.path} is not a Hugging Face model directory (no config.json)")
        if not any((self.path / f).is_file() for f in WEIGHT_FILES):
            raise FramelmError(
                f"{name} model: {self.path} has no weights in safetensors format ({' or '.join(WEIGHT_FILES)}); "
                f"save the model with model.save_pretrained(dir) (safe_serialization is the default)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise FramelmError(f"{name} model: cannot load the tokenizer in {self.path}: {exc}") from None
        bos = self.tokenizer.bos_token_id
        self.bos_id = bos if bos is not None else self.tokenizer.eos_token_id
        # What identifies a fast tokenizer is its serialised pipeline and vocabulary; models whose
        # tokenizers agree (framelm refmodels' weak and strong share the run's) encode each shard
        # once. A slow one's options live in Python code, so it is identified by nothing but itself.
        fast = getattr(self.tokenizer, "backend_tokenizer", None)
        self.tokenizer_identity = fast.to_str() if fast is not None else None
        self.encoding_key = (self.tokenizer_identity or id(self), self.bos_id)
        if self.bos_id is None:
            raise FramelmError(
                f"{name} model: the tokenizer in {self.path} defines neither a BOS nor an EOS token; every document "
                f"is scored after one of them. Set bos_token or eos_token in its tokenizer_config.json"
            )
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, local_files_only=True, trust_remote_code=trust_remote_code, use_safetensors=True,
            # framelm's backend only takes the weights: its attention is its own.
            dtype=dtype, attn_implementation=attn_implementation if backend == "transformers" else "sdpa",
        ).to(device).eval()
        self.device = device

        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.window = max_window_tokens or limit
        if self.window is None:
            raise FramelmError(f"{name} model: {self.path}/config.json has no max_position_embeddings; set context_tokens")
        if limit is not None and self.window > limit:
            raise FramelmError(f"context_tokens = {self.window} exceeds the {name} model's max_position_embeddings = {limit} ({self.path})")
        # Default overlap: a quarter of the window (>= 512 tokens of context at 2048) costs 1.33x
        # the forward passes of no overlap; half the window would cost 2x for little change in PPL.
        self.stride = stride_tokens or max(1, min(self.window - 1, self.window - self.window // 4))
        if not 1 <= self.stride < self.window:
            raise FramelmError(f"stride_tokens = {self.stride} must be between 1 and the window minus one ({self.window - 1}) for the {name} model")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if len(self.tokenizer) > vocab:
            raise FramelmError(f"{name} model: its tokenizer has {len(self.tokenizer)} tokens but the model only {vocab} output classes ({self.path})")
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._check_output_layer(vocab)
        # How prepare() packs windows (see framelm.scoring.packing): on the CPU one window per
        # row and no mask; on GPUs short windows share rows of 512 tokens under transformers'
        # dense block-diagonal mask, or, with framelm's block-sparse mask, every row is packed
        # to the full window and every batch has one shape, so the compiled model compiles once.
        self.row_tokens, self.full_rows = (512 if device.type == "cuda" else 0), False
        self.framelm = None
        if backend == "framelm":
            from framelm.hf_llama import framelm_from_hf

            try:
                self.framelm = framelm_from_hf(self.model, attention="flex" if device.type == "cuda" else "sdpa")
            except FramelmError as exc:
                raise FramelmError(f"{name} model ({self.path}): backend 'framelm' runs plain Llama models only, and this is {exc}; "
                                   f"use backend 'transformers'") from None
            self.model = None  # the weights now live in self.framelm
            if device.type == "cuda":
                self.framelm.compile_blocks()
                self.row_tokens, self.full_rows = self.window, True
        self.head = self.framelm.lm_head if self.framelm is not None else self.model.get_output_embeddings()

    @torch.inference_mode()
    def _check_output_layer(self, vocab: int) -> None:
        """The scorer applies the output layer itself (in chunks, softcapping included); refuse a
        model whose own forward does more to its logits (Granite's logits_scaling, Cohere's
        logit_scale, ...), since its scores would come out silently wrong."""
        probe = torch.tensor([[self.bos_id, *range(1, 8)]], device=self.device) % vocab
        own = self.model(input_ids=probe, use_cache=False).logits.float()
        hidden = self.model.base_model(input_ids=probe, use_cache=False).last_hidden_state
        logits = self._logits(self.model.get_output_embeddings(), hidden)
        tolerance = 1e-4 if self.model.dtype == torch.float32 else 2e-2
        if not torch.allclose(logits, own, rtol=tolerance, atol=tolerance * own.abs().max().item()):
            raise FramelmError(
                f"{self.name} model ({self.path}, {type(self.model).__name__}): its forward transforms the output layer's "
                f"logits in a way framelm's scorer does not reproduce (largest difference "
                f"{(logits - own).abs().max().item():.3g}); framelm scores models whose logits are the output layer's, "
                f"optionally with final_logit_softcapping")

    def _logits(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 vocabulary logits of final hidden states, softcapped where the model's config says so."""
        logits = head(hidden).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """[bos] + tokens of each text, as int64 arrays."""
        # split_special_tokens: a literal "<|endoftext|>" in a document is text, not a control token.
        ids = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        return [np.array([self.bos_id, *t], dtype=np.int64) for t in ids]

    @torch.inference_mode()
    def nll(self, batch: PackedBatch, logit_chunk_tokens: int) -> torch.Tensor:
        """Per-target negative log-likelihood (nats, fp32, on the model's device) of one packed batch."""
        dev = self.device
        input_ids = torch.from_numpy(batch.input_ids).to(dev, non_blocking=True)
        position_ids = torch.from_numpy(batch.position_ids).to(dev, non_blocking=True)
        hidden_index = torch.from_numpy(batch.hidden_index).to(dev, non_blocking=True)
        targets = torch.from_numpy(batch.target_ids).to(dev, non_blocking=True)
        try:
            hidden = self._hidden_states(input_ids, position_ids, batch.packed)
            hidden = hidden.flatten(0, 1).index_select(0, hidden_index)  # (n_targets, d_model)
            out = torch.empty(targets.numel(), dtype=torch.float32, device=dev)
            for i in range(0, targets.numel(), logit_chunk_tokens):
                logits = self._logits(self.head, hidden[i:i + logit_chunk_tokens])  # (chunk, vocab)
                out[i:i + logit_chunk_tokens] = F.cross_entropy(logits, targets[i:i + logit_chunk_tokens], reduction="none")
        except torch.cuda.OutOfMemoryError:
            raise FramelmError(
                f"out of GPU memory scoring a batch of {batch.input_ids.size} tokens with the {self.name} model; "
                f"re-run with a smaller --tokens-per-batch (e.g. {max(self.window, batch.input_ids.size // 2)}) "
                f"or --logit-chunk-tokens; finished shards are kept"
            ) from None
        return out

    def _hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packed: bool) -> torch.Tensor:
        """The final normed hidden states (rows, row_len, d_model) of one batch."""
        if self.framelm is not None:
            if not packed:  # one window per row: positions 0.., plain causal attention
                return self.framelm.hidden_states(input_ids)
            segments = torch.cumsum(position_ids == 0, dim=1)  # each window starts at position 0
            return self.framelm.hidden_states(input_ids, positions=position_ids, segments=segments)
        if self.model.config._attn_implementation.startswith("flash_attention"):
            # Flash-attention kernels see packed sequences only in one flattened row (varlen);
            # flattening keeps every flat index, so hidden_index stays valid.
            input_ids, position_ids = input_ids.view(1, -1), position_ids.view(1, -1)
        # attention_mask=None + restarting position_ids = packed sequences: transformers builds a
        # block-diagonal causal mask, so no token attends across documents or windows.
        return self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


@dataclasses.dataclass
class PreparedDocuments:
    """Texts tokenized and packed for every model: per model name, (tokens per doc, batches)."""

    n_docs: int
    per_model: dict[str, tuple[np.ndarray, list[PackedBatch]]]


class DocumentScorer:
    """Scores documents under several reference models, one model after another per call."""

    def __init__(self, models: list[ReferenceModel], tokens_per_batch: int | None, logit_chunk_tokens: int):
        on_cpu = all(m.device.type == "cpu" for m in models)
        # CPU: batches stay cache-sized. GPU: big batches keep the device busy.
        tokens_per_batch = tokens_per_batch or (8192 if on_cpu else 32768)
        for m in models:
            if tokens_per_batch < m.window:
                raise FramelmError(f"tokens_per_batch = {tokens_per_batch} is smaller than the {m.name} model's window of {m.window} tokens; raise it or lower context_tokens")
        self.models = models
        self.tokens_per_batch = tokens_per_batch
        self.logit_chunk_tokens = logit_chunk_tokens

    def prepare(self, texts: list[str]) -> PreparedDocuments:
        per_model, encoded = {}, {}
        for m in self.models:
            if m.encoding_key not in encoded:
                encoded[m.encoding_key] = m.encode(texts)
            seqs = encoded[m.encoding_key]
            n_tokens = np.array([len(s) - 1 for s in seqs], dtype=np.int64)
            per_model[m.name] = (n_tokens, pack_documents(seqs, m.window, m.stride, self.tokens_per_batch, m.bos_id,
                                                           m.row_tokens, m.full_rows))
        return PreparedDocuments(len(texts), per_model)

    def run(self, prepared: PreparedDocuments) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per model name: (summed NLL in nats per document as float64, predicted tokens per document)."""
        out = {}
        for m in self.models:
            n_tokens, batches = prepared.per_model[m.name]
            nll = torch.zeros(prepared.n_docs, dtype=torch.float64)
            if batches:
                # One device-to-host copy per model (no sync per batch), then summed on the CPU in
                # float64 in a fixed order, so a shard's sums never depend on atomics' timing.
                per_target = torch.cat([m.nll(batch, self.logit_chunk_tokens) for batch in batches]).cpu()
                target_doc = torch.from_numpy(np.concatenate([batch.target_doc for batch in batches]))
                nll.index_add_(0, target_doc, per_target.double())
            out[m.name] = (nll.numpy(), n_tokens)
        return out
