"""The pipeline's stages: what each is called, where its code lives, what it reads.

Each stage is one module with a config dataclass and one entry function
`fn(cfg, run: RunDir) -> dict` that writes under `RUN/<key>/` and returns counts for the
manifest. Modules are imported only when their stage runs, so `framelm --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "module:ConfigClass"
    function: str  # "module:function"
    after: tuple[str, ...]  # stages whose outputs it reads (unless the config says otherwise)
    help: str
    cli: tuple[str, ...] = ()  # command words; defaults to (name,)
    io: str = ""  # one line for --help: what the stage reads and writes

    @property
    def description(self) -> str:
        return f"{self.help}. {self.io[0].upper() + self.io[1:]}." if self.io else self.help

    @property
    def words(self) -> tuple[str, ...]:
        return self.cli or (self.name,)

    def config_class(self) -> type:
        return _load(self.config)

    def entry(self) -> Callable[..., dict[str, Any]]:
        return _load(self.function)


def _load(spec: str) -> Any:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("ingest", "framelm.ingest:IngestConfig", "framelm.ingest:ingest_corpus", (),
              "read JSON lines / Parquet / text files / HF datasets into a Parquet document table",
              io="reads the --inputs files (JSON lines, Parquet, text, HF datasets, builtin); writes RUN/ingest/documents/part-*.parquet, RUN/ingest/rejects.jsonl"),
        Stage("tokenizer", "framelm.tokenizer:TokenizerTrainConfig", "framelm.tokenizer:train_tokenizer", ("ingest",),
              "train a byte-level BPE tokenizer on a sample of the ingested corpus", cli=("tokenizer", "train"),
              io="reads RUN/ingest/documents/; writes RUN/tokenizer/"),
        Stage("tokenize", "framelm.tokenize:TokenizeConfig", "framelm.tokenize:tokenize_corpus", ("ingest",),
              "tokenize every document into a flat memory-mapped token store",
              io="reads RUN/ingest/documents/ and RUN/tokenizer/ (or --tokenizer); writes RUN/tokenize/ (tokens.bin, index.parquet, meta.json)"),
        Stage("refmodels", "framelm.refmodels:RefModelsConfig", "framelm.refmodels:train_reference_models", ("tokenize",),
              "train weak and strong reference models on a held-out sample of the corpus",
              io="reads RUN/tokenize/; writes RUN/refmodels/weak/, RUN/refmodels/strong/"),
        Stage("score", "framelm.score:ScoreConfig", "framelm.score:score_documents", ("tokenize",),
              "per-document PPL under the weak and strong reference models, and PD",
              io="reads RUN/ingest/, RUN/tokenize/, RUN/refmodels/ (or --weak-model/--strong-model); writes RUN/score/scores.parquet"),
        Stage("partition", "framelm.partition:PartitionConfig", "framelm.partition:partition_documents", ("score",),
              "split documents into quadrants (or a k x m grid) by PPL and PD",
              io="reads RUN/score/scores.parquet; writes RUN/partition/ (quadrants.parquet, summary.json)"),
        Stage("schedule", "framelm.schedule:ScheduleConfig", "framelm.schedule:build_schedules", ("partition",),
              "order the quadrants into stages: frame, random, permutations, two-phase, YAML",
              io="reads RUN/score/scores.parquet, RUN/partition/; writes RUN/schedule/<strategy>/ (order.parquet, stages.yaml)"),
        Stage("export", "framelm.export:ExportConfig", "framelm.export:export_schedules", ("schedule",),
              "write schedules as token streams, llm.c shards, Megatron, nanotron or text",
              io="reads RUN/schedule/, RUN/tokenize/; writes RUN/export/<strategy>/<format>/"),
        Stage("train", "framelm.train:TrainConfig", "framelm.train:train_model", ("export",),
              "train a proxy model on one exported schedule",
              io="reads RUN/export/<schedule>/ and RUN/tokenize/ (held-out sets, tokenizer); "
                 "writes RUN/train/<schedule>/seed<k>/"),
        Stage("eval", "framelm.evaluate:EvalConfig", "framelm.evaluate:evaluate_model", (),
              "held-out loss per source and quadrant, and downstream tasks via lm-evaluation-harness",
              io="reads a model (--model: a folder or train/<schedule>/seed<k>) and RUN/ingest/ held-out documents; writes RUN/eval/<name>/results.json"),
        Stage("compare", "framelm.compare:CompareConfig", "framelm.compare:compare_schedules", ("export",),
              "train and evaluate one model per schedule and seed, and tabulate the differences",
              io="reads RUN/export/; writes RUN/train/, RUN/eval/, RUN/compare/ (results.json, results.csv)"),
        Stage("report", "framelm.report:ReportConfig", "framelm.report:build_report", (),
              "an HTML page with plots of scores, quadrants, schedules, losses and accuracies",
              io="reads whatever stages have finished (score, partition, schedule, train, eval, compare); writes RUN/report/index.html"),
    ]
}

ORDER = list(STAGES)
