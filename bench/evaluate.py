"""Held-out loss throughput of `framelm eval` against lm-evaluation-harness's rolling log-likelihood.

The baseline is what a user reaches for to get a model's loss on a set of documents:
lm-eval's HFLM `loglikelihood_rolling` (the request type of its wikitext task), which scores
each document from an EOS prefix, exactly framelm.heldout's definition when a document fits
one window. framelm's `document_nll` batches windows sorted by length instead.

Untimed setup in a temporary folder: a byte-level BPE tokenizer trained on Python
standard-library files, a randomly initialised Llama of the given shape (HF format,
safetensors), and --docs documents cut from those files, each at most --seq-len tokens.
Timed, in the same process, on the same model and texts: both paths including tokenisation.
Checks that the per-document NLLs agree, and prints one JSON object.

    python bench/evaluate.py --docs 400 --seq-len 512
"""

from __future__ import annotations

import os
import sys

# bench/tokenize.py shadows the standard library's `tokenize`; keep this folder off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402  (after the path fix above)
import json
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def stdlib_texts(max_files: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.glob("*.py"))[:max_files]:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def build_model(folder: Path, texts: list[str], hidden: int, layers: int, seq_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=seq_len, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def documents(folder: Path, texts: list[str], n_docs: int, seq_len: int, seed: int) -> list[str]:
    """Pieces of the texts, log-normal token lengths capped below seq_len, cut at token boundaries."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    stream = np.concatenate([tok.encode(t) for t in texts])
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq_len / 4), 0.8, n_docs).astype(int), 8, seq_len - 2)
    starts = rng.integers(0, len(stream) - seq_len, n_docs)
    return [tok.decode(stream[s:s + n]) for s, n in zip(starts, lengths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from framelm.evaluate import document_nll

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        texts = stdlib_texts(200)
        build_model(folder, texts, args.hidden, args.layers, args.seq_len)
        docs = documents(folder, texts, args.docs, args.seq_len, args.seed)

        lm = HFLM(pretrained=str(folder), device=device, batch_size=args.batch_size, dtype="float32")
        requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        baseline_ll = np.array(lm.loglikelihood_rolling(requests, disable_tqdm=True))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        baseline_s = time.perf_counter() - start
        del lm

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).to(device).eval()
        start = time.perf_counter()
        token_docs = [np.array(ids, dtype=np.int64) for ids in tok(docs, add_special_tokens=False)["input_ids"]]
        framelm_nll = document_nll(model, token_docs, tok.eos_token_id, args.seq_len, args.batch_size, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        framelm_s = time.perf_counter() - start

    n_tokens = int(sum(len(d) for d in token_docs))
    rel = np.abs(framelm_nll + baseline_ll) / np.maximum(np.abs(baseline_ll), 1e-9)
    print(json.dumps({
        "bench": "evaluate.heldout_loss", "device": device, "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "docs": args.docs, "tokens": n_tokens, "seq_len": args.seq_len,
        "model": {"hidden": args.hidden, "layers": args.layers, "params": sum(p.numel() for p in model.parameters())},
        "batch_size": args.batch_size,
        "baseline": {"name": "lm_eval HFLM.loglikelihood_rolling", "seconds": round(baseline_s, 3),
                     "tokens_per_s": round(n_tokens / baseline_s, 1)},
        "framelm": {"name": "framelm.evaluate.document_nll", "seconds": round(framelm_s, 3),
                    "tokens_per_s": round(n_tokens / framelm_s, 1)},
        "speedup": round(baseline_s / framelm_s, 2),
        "max_rel_nll_difference": float(rel.max()),
    }))


if __name__ == "__main__":
    main()
