"""Benchmark: framelm's document scorer against the naive Hugging Face loop a user would write.

Both run in this process on the same real documents (all sources of ../shared/data/corpus
mixed) and the same randomly initialised models (SmolLM-360M-shaped by default; `--shape tiny`
for a CPU run):

  baseline  one model, documents in shuffled order, batches of 32 padded to the longest and
            truncated at 1024 tokens, full logits -> cross-entropy (bf16 on CUDA, fp32 on CPU).
  framelm   the score stage's shard scorer: every token of every document (windows on long
            ones), packed rows, chunked logits, tokenization on a background thread, weak and
            strong model together. Its tokens_per_s counts both models' predicted tokens (the
            naive loop would run twice to score both), so MFU and the ratio to the baseline
            compare the same work; doc_tokens_per_s is half that. Once per backend: `framelm`
            (the models converted to framelm's decoder; compiled, full rows and FlexAttention on
            GPUs) and `transformers` (the default).

Only real predicted tokens count (no padding, no recomputed window overlap). Prints one JSON
object; each arm's result also goes to stderr as it finishes, and an arm that fails is
recorded with its error instead of ending the run.
Example:  python -m bench.score --shape tiny --max-docs 200
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from framelm.rundir import RunDir
from framelm.score import ScoreConfig, ShardScorer, merge_shards, score_shards_local
from framelm.train.loop import peak_flops

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
SHAPES = {
    "smollm-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                        num_key_value_heads=5, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=True),
}
# framelm's own decoder first: the run decides whether it becomes the default, and a run cut short
# by its time limit keeps the arms that finished
BACKENDS = ("framelm", "transformers")


def read_documents(corpus: Path, max_docs: int) -> list[dict]:
    files = sorted(corpus.glob("*.jsonl.gz"))
    if not files:
        sys.exit(f"no corpus at {corpus}; this benchmark reads ../shared/data/corpus (or --corpus DIR of *.jsonl.gz)")
    per_source = math.ceil(max_docs / len(files))
    docs = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for _, line in zip(range(per_source), fh):
                docs.append(json.loads(line))
    return docs[:max_docs]


def build_models(root: Path, docs: list[dict], shape: str) -> tuple[dict[str, Path], int]:
    """Two random models (weak, strong) sharing a BPE tokenizer trained on the documents;
    also the forward FLOPs per token (2 x the weights used per token: the input embedding is a
    lookup, the output layer a matmul)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dims = SHAPES[shape]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((d["text"] for d in docs), trainers.BpeTrainer(
        vocab_size=dims["vocab_size"], special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    paths = {}
    for seed, name in enumerate(("weak", "strong")):
        torch.manual_seed(seed)
        paths[name] = root / name
        model = LlamaForCausalLM(LlamaConfig(**dims))
        model.save_pretrained(paths[name])
        hf_tok.save_pretrained(paths[name])
    embedding = model.get_input_embeddings().weight.numel()
    tied = dims["tie_word_embeddings"]
    flops_per_token = 2 * (model.num_parameters() - (0 if tied else embedding))
    return paths, flops_per_token


def baseline(model_dir: Path, texts: list[str], device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    tokens = 0
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(order), 32):
            batch = [tok.eos_token + texts[j] for j in order[i:i + 32]]
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=1024).to(device)
            logits = model(**enc).logits
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)[:, 1:]
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
            tokens += int((labels != -100).sum())
    _sync(device)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def framelm_scorer(root: Path, docs: list[dict], cfg: ScoreConfig, device: torch.device) -> dict:
    from tqdm.auto import tqdm

    run = make_run(root, docs)
    shards = ShardScorer(cfg, run)  # model loading is outside the timed part, as for the baseline
    todo = list(range(math.ceil(len(docs) / cfg.docs_per_shard)))
    # Untimed warm-up on a shard's worth of documents from every source, long and short:
    # compilation (framelm backend on GPUs) is paid once per process, not per token, so it is
    # reported apart.
    sample = docs[:: max(1, len(docs) // cfg.docs_per_shard)][:cfg.docs_per_shard]
    _sync(device)
    start = time.perf_counter()
    shards.scorer.run(shards.scorer.prepare([d["text"] for d in sample]))
    _sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    with tqdm(total=len(docs), desc="framelm", unit="doc", disable=True) as progress:
        score_shards_local(shards, todo, progress)
    _sync(device)
    seconds = time.perf_counter() - start
    scores = merge_shards(run, len(todo))
    tokens = {m: int(pc.sum(scores.column(f"{m}_tokens")).as_py() or 0) for m in ("weak", "strong")}
    mean_log_ppl = {m: round(float(pc.mean(pc.ln(scores.column(f"ppl_{m}"))).as_py()), 5) for m in ("weak", "strong")}
    # Both models ran in `seconds`, so the tokens a model predicted per second (the baseline's
    # measure, and what MFU counts) is their sum over it; the naive loop would take twice its
    # own time to score both. doc_tokens_per_s: document tokens scored under both, per second.
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round((tokens["weak"] + tokens["strong"]) / seconds, 1),
            "doc_tokens_per_s": round((tokens["weak"] + tokens["strong"]) / 2 / seconds, 1),
            "warmup_s": round(warmup, 1), "mean_log_ppl": mean_log_ppl}


def make_run(root: Path, docs: list[dict]) -> RunDir:
    run = RunDir(root)
    texts = [d["text"] for d in docs]
    ids = [d["id"] for d in docs]
    n_bytes = pa.array([len(t.encode()) for t in texts], pa.int64())
    table = pa.table({"id": ids, "source": [d["source"] for d in docs], "split": ["train"] * len(docs), "text": texts,
                      "n_chars": pa.array([len(t) for t in texts], pa.int64()), "n_bytes": n_bytes})
    pq.write_table(table, run.stage_dir("ingest/documents") / "part-00000.parquet")
    pq.write_table(pa.table({"id": ids, "n_tokens": pa.array([0] * len(ids), pa.int64())}),
                   run.stage_dir("tokenize") / "index.parquet")
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-docs", type=int, default=2000)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm-360m")
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--docs-per-shard", type=int, default=512)
    p.add_argument("--corpus", type=Path, default=CORPUS, help="folder of *.jsonl.gz files with id, source, text (default: %(default)s)")
    args = p.parse_args()

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    docs = read_documents(args.corpus, args.max_docs)
    texts = [d["text"] for d in docs]
    arms: dict[str, dict] = {}
    peak = peak_flops(device)
    started = time.perf_counter()

    def arm(name: str, measure) -> None:
        try:
            arms[name] = measure()
        except Exception as exc:  # one arm failing must not cost the others' figures
            arms[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        if "tokens_per_s" in arms[name]:
            arms[name]["mfu"] = round(flops_per_token * arms[name]["tokens_per_s"] / peak, 4) if peak else None
        arms[name]["elapsed_s"] = round(time.perf_counter() - started, 1)  # against the script's time limit
        print(json.dumps({name: arms[name]}), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        models, flops_per_token = build_models(Path(tmp) / "models", docs, args.shape)
        arm("baseline", lambda: baseline(models["weak"], texts, device, dtype))
        for backend in BACKENDS:
            cfg = ScoreConfig(weak_model=str(models["weak"]), strong_model=str(models["strong"]), backend=backend,
                              docs_per_shard=args.docs_per_shard, tokens_per_batch=args.tokens_per_batch)
            arm(f"framelm_backend_{backend}", lambda: framelm_scorer(Path(tmp) / f"run-{backend}", docs, cfg, device))
    result = {
        "bench": "score", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "shape": args.shape, "docs": len(docs),
        "chars": sum(len(t) for t in texts), **arms,
    }
    base = arms["baseline"].get("tokens_per_s")
    for backend in BACKENDS:
        ours = arms[f"framelm_backend_{backend}"]
        if base and "tokens_per_s" in ours:
            result[f"speedup_backend_{backend}"] = round(ours["tokens_per_s"] / base, 3)
            # Both backends predict the same tokens; the baseline sees this share of them.
            result["baseline_token_coverage"] = round(arms["baseline"]["tokens"] / ours["tokens"]["weak"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
