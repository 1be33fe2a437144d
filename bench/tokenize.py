"""Tokens per second of `framelm tokenize` against the loop a user would write first.

Builds a run directory in a temporary folder (ingest + a trained 8192-token BPE tokenizer,
untimed) from the shared corpus (../shared/data/corpus, all five sources, cut to --max-chars
characters spread evenly over the files) or, where that is absent, the built-in corpus. Then,
in the same process and on the same documents, times:

- baseline: a single-process loop `tokenizer.encode(text)` over the documents, already in memory;
- framelm: the whole `tokenize` stage (read Parquet, encode in worker processes, write the store).

Prints one JSON object with both rates and their ratio.

    python bench/tokenize.py --max-chars 20000000
"""

from __future__ import annotations

import os
import sys

# This file shares its name with the standard library's `tokenize`, which numpy and pyarrow
# import indirectly; keep its own folder off the import path so they find the real one.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported

import argparse  # noqa: E402  (after the path fix above)
import gzip
import json
import platform
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from framelm.ingest import IngestConfig
from framelm.pipeline import run_stage
from framelm.rundir import RunDir
from framelm.tokenize import TokenizeConfig, available_cpus
from framelm.tokenizer import TokenizerTrainConfig, load_tokenizer

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def corpus_subset(corpus: Path, max_chars: int | None, out_dir: Path) -> list[str]:
    """Input paths for ingest: the corpus files, or an even cut of them to `max_chars`."""
    files = sorted(corpus.glob("*.jsonl.gz"))
    if max_chars is None:
        return [str(f) for f in files]
    per_file = max_chars // len(files)
    inputs = []
    for f in files:
        taken = 0
        out = out_dir / f.name
        with gzip.open(f, "rt", encoding="utf-8") as src, gzip.open(out, "wt", encoding="utf-8", compresslevel=1) as dst:
            for line in src:
                if taken >= per_file:
                    break
                taken += len(json.loads(line)["text"])
                dst.write(line)
        inputs.append(str(out))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-chars", type=int, default=None, help="cut the corpus to about this many characters")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="framelm tokenize worker processes")
    parser.add_argument("--corpus", type=Path, default=SHARED_CORPUS, help="folder of *.jsonl.gz files")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="framelm-bench-") as tmp:
        tmp_dir = Path(tmp)
        if args.corpus.is_dir():
            inputs = corpus_subset(args.corpus, args.max_chars, tmp_dir)
            ingest_cfg = IngestConfig(inputs=inputs)
        else:
            print(f"# {args.corpus} not found; using the built-in corpus", file=sys.stderr)
            ingest_cfg = IngestConfig(inputs=["builtin"], builtin_max_chars=args.max_chars or 3_000_000)
        run = RunDir(tmp_dir / "run")
        ingest_counts = run_stage("ingest", ingest_cfg, run)
        run_stage("tokenizer", TokenizerTrainConfig(vocab_size=8192, sample_bytes=20_000_000), run)

        parts = sorted(run.path("ingest", "documents").glob("part-*.parquet"))
        texts = [t for p in parts for t in pq.read_table(p, columns=["text"])["text"].to_pylist()]
        tok, _ = load_tokenizer(run.path("tokenizer"))
        start = time.perf_counter()
        baseline_tokens = sum(len(tok.encode(t).ids) for t in texts)
        baseline_s = time.perf_counter() - start
        del texts

        start = time.perf_counter()
        counts = run_stage("tokenize", TokenizeConfig(num_workers=args.workers), run)
        framelm_s = time.perf_counter() - start
        if counts["doc_tokens"] != baseline_tokens:
            raise SystemExit(f"token counts differ: framelm {counts['doc_tokens']}, baseline {baseline_tokens}")

    result = {
        "benchmark": "tokenize", "docs": ingest_counts["docs"], "chars": ingest_counts["chars"], "tokens": baseline_tokens,
        "baseline": "single-process loop of tokenizers.Tokenizer.encode, texts in memory",
        "baseline_s": round(baseline_s, 3), "baseline_tokens_per_s": round(baseline_tokens / baseline_s),
        "framelm_s": round(framelm_s, 3), "framelm_tokens_per_s": round(baseline_tokens / framelm_s),
        "speedup": round(baseline_s / framelm_s, 3), "workers": args.workers, "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
