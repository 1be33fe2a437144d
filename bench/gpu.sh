#!/usr/bin/env bash
# The GPU measurements of issues 3 (trainer) and 4 (scorer) as one device call, because a
# session's device time is short and every machine start costs minutes.
#
#   bash bench/gpu.sh prepare     here, once: copy the documents the score benchmark reads from
#                                 ../shared/data/corpus into .data/corpus (git-ignored; ~3 MB)
#   bash bench/gpu.sh             on the GPU machine, from the repository root, with .data carried:
#                                 run(command="bash bench/gpu.sh", carry=[".data"], timeout_s=540)
#   SMOKE=1 bash bench/gpu.sh     the same steps at CPU sizes, to check the script itself here
#
# framelm is not installed there: the GPU image has torch, transformers, tokenizers, safetensors,
# pyarrow, numpy, pyyaml and tqdm, which is all these two benchmarks import, so src/ goes on
# PYTHONPATH. Each
# benchmark's JSON (and its stderr) lands in $OUT (default: bench-out/), ready for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS_PER_SOURCE=400  # bench/score.py reads the first max_docs / 5 documents of each source file

if [[ "${1:-}" == prepare ]]; then
    src=../shared/data/corpus
    [[ -d $src ]] || { echo "no $src here: the score benchmark needs real documents" >&2; exit 1; }
    mkdir -p .data/corpus
    for f in "$src"/*.jsonl.gz; do
        # head closes the pipe early on purpose; zcat's SIGPIPE is not an error here
        { zcat "$f" || true; } | head -n "$DOCS_PER_SOURCE" | gzip -c > ".data/corpus/$(basename "$f").tmp"
        mv ".data/corpus/$(basename "$f").tmp" ".data/corpus/$(basename "$f")"
    done
    du -sh .data/corpus
    exit 0
fi

OUT=${OUT:-bench-out}
mkdir -p "$OUT"
rm -f "$OUT"/train.json "$OUT"/score.json  # a benchmark that does not run leaves no figures of an earlier run
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PY:-python3}
if [[ -n "${SMOKE:-}" ]]; then
    train_args=(--smoke)
    score_args=(--shape tiny --max-docs 40 --tokens-per-batch 4096 --docs-per-shard 20)
else
    train_args=()
    score_args=(--max-docs $((5 * DOCS_PER_SOURCE)))
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"; \
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' \
  || echo "the version probe failed"; } > "$OUT/machine.txt"
status=0
# One benchmark failing must not cost the other's figures: run both, print each one's exit code,
# and exit 1 if either failed.
# Each gets its own time limit, so one that runs long cannot starve the other (the device call
# allows 540 s); both print every measurement to their .err file as it finishes.
timeout "${TRAIN_LIMIT_S:-270}" "$PY" -m bench.train "${train_args[@]}" > "$OUT/train.json" 2> "$OUT/train.err" || { rc=$?; status=1; echo "bench.train failed ($rc; 124 = time limit); see $OUT/train.err" >&2; }
if [[ -d .data/corpus ]]; then  # only the score benchmark reads documents: without them the train one still runs
    timeout "${SCORE_LIMIT_S:-240}" "$PY" -m bench.score --corpus .data/corpus "${score_args[@]}" > "$OUT/score.json" 2> "$OUT/score.err" || { rc=$?; status=1; echo "bench.score failed ($rc; 124 = time limit); see $OUT/score.err" >&2; }
else
    echo "no .data/corpus: bench.score skipped; run 'bash bench/gpu.sh prepare' here and carry .data" | tee "$OUT/score.err" >&2
    status=1
fi
cat "$OUT/machine.txt" "$OUT/train.json" "$OUT/score.json" 2>/dev/null || true  # a skipped benchmark has no JSON
exit $status
