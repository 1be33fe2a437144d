"""`framelm eval`: evaluate one Hugging Face causal LM on held-out text and downstream tasks.

The model is a folder in Hugging Face format (config.json, model.safetensors, tokenizer), given
as a path or as a training key: `train/frame/seed0` means RUN/train/frame/seed0/hf (final weights),
`train/frame/seed0/hf-avg` its checkpoint average RUN/train/frame/seed0/hf-avg.

Held-out loss: on framelm.heldout's sets of held-out documents ("all", "source/<s>" and, where
RUN/partition exists, "quadrant/<q>"), measured as the trainer measures it: each document read
on its own after an EOS, its tokens scored (not the EOS). Loss is nats per token; bits per byte
is the same sum in bits over the documents' UTF-8 bytes, comparable across tokenizers.

Downstream tasks run through lm-evaluation-harness (framelm.evaltasks): task files named by
path, by name from `task_dir`, or "builtin" for tasks cut from the held-out documents
(framelm.builtin_tasks).

Reads: the model folder; RUN/tokenize/{tokens.bin,index.parquet,meta.json,tokenizer/};
RUN/partition/quadrants.parquet with RUN/score/scores.parquet (optional); RUN/ingest/documents
(built-in tasks).
Writes: RUN/eval/<name>/results.json, RUN/eval/<name>/harness/<task>.yaml,
RUN/eval/tasks/rows<rows>-seed<seed>/<builtin task>.jsonl.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from framelm import fsutil
from framelm.builtin_tasks import write_builtin_tasks
from framelm.config import ConfigError, StageConfig, field
from framelm.device import resolve_device
from framelm.errors import FramelmError
from framelm.evaltasks import TaskFile, check_task_file, run_harness, write_task_configs
from framelm.heldout import document_windows, heldout_sets
from framelm.labels import LABELS, SCORES
from framelm.progress import progress_bar
from framelm.rundir import RunDir
from framelm.tokenstore import TokenStore

log = logging.getLogger("framelm")

BUILTIN = "builtin"
AVERAGED = "hf-avg"  # a training run's checkpoint average, next to hf/ (its final weights)


@dataclasses.dataclass
class EvalConfig(StageConfig):
    model: str = field("train/frame/seed0", help="model to evaluate: an HF model folder, or a training key "
                       "'train/<schedule>/seed<k>' meaning RUN/train/<schedule>/seed<k>/hf (final weights), or "
                       "'train/<schedule>/seed<k>/hf-avg' for its checkpoint average (trained with train.average)")
    name: str | None = field(None, help="results go to RUN/eval/<name>/; default: the training key without "
                             "'train/' (e.g. frame/seed0; frame/seed0-avg for hf-avg), or the model folder's name")
    tasks: list[str] = field(default_factory=lambda: [BUILTIN], help="downstream tasks: JSON-lines files, names of "
                             "files in task_dir (e.g. piqa), or 'builtin' for tasks cut from the held-out documents")
    task_dir: str | None = field(None, help="folder of <name>.jsonl task files that task names resolve against "
                                 "(e.g. ../shared/data/eval)")
    limit: int | None = field(None, help="score at most this many rows per task (the first ones); None: all")
    heldout: bool = field(True, help="measure held-out loss and bits per byte per source and quadrant")
    heldout_tokens: int = field(200_000, help="held-out tokens per set (all, per source, per quadrant); documents "
                                "are taken in framelm.heldout's fixed pseudo-random order")
    seq_len: int | None = field(None, help="held-out window length in tokens; default: for a training key the "
                                "run's train seq_len (as the trainer measures it), else the model's max_position_embeddings")
    builtin_rows: int = field(500, help="rows per built-in task")
    seed: int = field(0, help="seed of the built-in tasks' sampling")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="model weights' dtype during evaluation")
    device: str = field("auto", help="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'", hash=False)
    batch_size: int = field(16, help="sequences per forward pass", hash=False)
    trust_remote_code: bool = field(False, help="let transformers run code shipped in the model folder (only for models you trust)")

    def validate(self) -> None:
        if not self.model.strip():
            raise ConfigError("'model' is empty; give a model folder or a key like train/frame/seed0")
        if self.name is not None and not self.name.strip():
            raise ConfigError(f"'name' = {self.name!r} is empty; give a results folder name like frame/seed0")
        self.instance()  # refuses a results folder inside RUN/eval/tasks
        if not self.tasks and not self.heldout:
            raise ConfigError("'tasks' is empty and 'heldout' is false: nothing to evaluate")
        for key in ("heldout_tokens", "builtin_rows", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"'{key}' = {getattr(self, key)} must be positive")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"'limit' = {self.limit} must be positive (or null for all rows)")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"'seq_len' = {self.seq_len} must be at least 2")

    @property
    def train_key(self) -> str | None:
        """The training key when `model` names a training run's weights (final or averaged), else None."""
        parts = self.model.strip("/").split("/")
        if Path(self.model).is_absolute() or parts[0] != "train" or len(parts) not in (3, 4) \
                or parts[3:] not in ([], [AVERAGED]):
            return None
        return "/".join(parts[:3])

    @property
    def averaged(self) -> bool:
        """Whether `model` names a training run's checkpoint average (hf-avg/) rather than its final weights."""
        return self.train_key is not None and self.model.strip("/") != self.train_key

    def instance(self) -> str:
        """The results folder under RUN/eval: `name`, else derived from `model`."""
        if self.name:
            instance = self.name
        elif self.train_key:
            # beside, not inside, the final weights' folder: run_stage clears that folder when it re-runs
            instance = self.train_key.split("/", 1)[1] + ("-avg" if self.averaged else "")
        else:
            instance = Path(self.model).name or "model"
        # Checked here, where every caller (run_stage, compare) learns the folder before run_stage
        # clears it: RUN/eval/tasks holds the built-in task files (framelm.builtin_tasks).
        if instance.split("/")[0] == "tasks":
            origin = f"'name' = {self.name!r}" if self.name else f"the name derived from 'model' = {self.model!r}"
            hint = " (framelm compare names evaluations after their schedule: rename it)" if self.train_key else ""
            raise ConfigError(f"{origin} puts results in RUN/eval/{instance}, inside RUN/eval/tasks where the built-in "
                              f"tasks are written; set 'name' to another folder (e.g. name: my-model){hint}")
        return instance

    def input_fingerprint(self, run: RunDir) -> dict[str, Any]:
        """Results depend on the task files' and an outside model's contents, not only on their
        paths: an edited file re-runs the evaluation. (A trained model is covered by its train
        record's hash, an upstream of this stage.)"""
        with run.content_hashes() as hashes:
            data: dict[str, Any] = {"tasks": {e: hashes.fingerprint(p)["sha256"] for e in self.tasks
                                              if (p := task_path(e, self.task_dir))}}
            if not self.train_key:
                data["model"] = fsutil.model_dir_fingerprint(Path(self.model).expanduser(), hashes)
            if self.heldout:
                # The quadrant sets come from whatever partition the run holds, which is no upstream
                # of this stage (a trained model's is, through its schedule; an outside model's is not).
                data["quadrants"] = {p: hashes.fingerprint(run.path(p))["sha256"] for p in (LABELS, SCORES)
                                     if run.path(LABELS).is_file()}
        return data

    def upstream(self) -> tuple[str, ...]:
        keys = [self.train_key] if self.train_key else []
        if self.heldout:
            keys.append("tokenize")
        if BUILTIN in self.tasks:
            keys.append("ingest")
        return tuple(keys)


def resolve_model(cfg: EvalConfig, run: RunDir) -> Path:
    """The model folder `cfg.model` names, checked to hold safetensors weights."""
    if cfg.train_key:
        path = run.path(cfg.train_key, AVERAGED if cfg.averaged else "hf")
        hint = (f"; train {cfg.train_key} with train.average set (ema, sma or wma) to get its checkpoint average"
                if cfg.averaged else f"; run `framelm train` for {cfg.train_key} first")
    else:
        path, hint = Path(cfg.model).expanduser().resolve(), ""
    if not (path / "config.json").is_file():
        raise FramelmError(f"model: {path} is not a Hugging Face model folder (no config.json){hint}")
    if not any(path.glob("*.safetensors")):
        raise FramelmError(f"model: {path} has no *.safetensors weights; framelm loads weights only from safetensors "
                           f"(re-save the model with save_pretrained(..., safe_serialization=True))")
    return path


def task_path(entry: str, task_dir: str | None) -> Path | None:
    """The file a `tasks` entry names: a path, or `<task_dir>/<entry>.jsonl`; None if neither exists."""
    path = Path(entry).expanduser()
    if not path.is_file() and task_dir is not None and "/" not in entry and not entry.endswith(".jsonl"):
        path = Path(task_dir).expanduser() / f"{entry}.jsonl"
    return path if path.is_file() else None


def resolve_tasks(cfg: EvalConfig, run: RunDir) -> list[TaskFile]:
    """The task files `cfg.tasks` names, each checked row by row."""
    files: list[Path] = []
    for entry in cfg.tasks:
        if entry == BUILTIN:
            files.extend(write_builtin_tasks(run, cfg.builtin_rows, cfg.seed))
            continue
        path = task_path(entry, cfg.task_dir)
        if path is None:
            hint = f" (task_dir is {cfg.task_dir})" if cfg.task_dir else " (set task_dir to resolve task names)"
            raise FramelmError(f"tasks: {entry!r} is neither a task file nor a task name{hint}")
        files.append(path)
    return [check_task_file(p) for p in files]


# -- held-out loss ------------------------------------------------------------------------------

def document_nll(model: Any, docs: list[np.ndarray], eos_id: int, seq_len: int, batch_size: int, device: str) -> np.ndarray:
    """Summed NLL in nats of each document's tokens, each document read on its own after an EOS.

    This is framelm.heldout's definition (the one the trainer logs), for any HF causal LM: the
    windows of `document_windows`. They are batched by length so little is padded; right
    padding cannot change a causal model's earlier positions.
    """
    import torch
    import torch.nn.functional as F

    windows = document_windows(docs, eos_id, seq_len)
    windows.sort(key=lambda w: -len(w[1]))
    nll = np.zeros(len(docs), dtype=np.float64)
    with torch.inference_mode():
        for first in progress_bar(range(0, len(windows), batch_size), desc="held-out loss", unit="batch"):
            batch = windows[first:first + batch_size]
            width = len(batch[0][1])
            inputs = np.full((len(batch), width), eos_id, dtype=np.int64)
            targets = np.full((len(batch), width), -100, dtype=np.int64)
            for row, (_, x, y) in enumerate(batch):
                inputs[row, :len(x)] = x
                targets[row, :len(y)] = y
            logits = model(input_ids=torch.from_numpy(inputs).to(device)).logits.float()  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).to(device).flatten(),
                                   ignore_index=-100, reduction="none").view(len(batch), width)
            np.add.at(nll, [d for d, _, _ in batch], loss.sum(1).double().cpu().numpy())
    return nll


def _check_tokenizer(model_dir: Path, run: RunDir) -> None:
    """Held-out tokens come from the run's tokenizer; refuse a model trained with another."""
    run_tok = run.path("tokenize", "tokenizer", "tokenizer.json")
    model_tok = model_dir / "tokenizer.json"
    if run_tok.is_file() and model_tok.is_file():
        if fsutil.read_json(run_tok).get("model") != fsutil.read_json(model_tok).get("model"):
            raise FramelmError(f"{model_dir} uses another tokenizer than {run_tok}; held-out loss reads the run's "
                               f"token store, so it needs the run's tokenizer (or set heldout: false)")


def _trained_seq_len(cfg: EvalConfig, run: RunDir) -> int | None:
    """The rows a training key's model was trained (and its held-out loss logged) on. Its exported
    max_position_embeddings is the preset's, often longer: windows of that length would read
    positions it never trained on and disagree with the training log and with `framelm compare`."""
    if not cfg.train_key:
        return None
    seq_len = ((run.record(cfg.train_key) or {}).get("config") or {}).get("seq_len")
    return int(seq_len) if seq_len else None


def evaluate_heldout(model_dir: Path, cfg: EvalConfig, run: RunDir, device: str) -> dict[str, dict[str, Any]]:
    """Loss and bits per byte on each held-out set of framelm.heldout ("all", "source/<s>", "quadrant/<q>")."""
    import torch
    from transformers import AutoModelForCausalLM

    _check_tokenizer(model_dir, run)
    store = TokenStore.open(run)
    sets = heldout_sets(run, cfg.heldout_tokens)
    if not sets:
        raise FramelmError(f"{run.path('tokenize', 'index.parquet')} has no documents with split == 'heldout'; "
                           f"re-run ingest with a held-out share, or set heldout: false")
    # The sets overlap ("all" and "source/x" share documents): score each distinct document once.
    unique: dict[bytes, int] = {}
    for hset in sets.values():
        for doc in hset.docs:
            unique.setdefault(doc.tobytes(), len(unique))
    docs = [np.frombuffer(key, dtype=np.int64) for key in unique]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype), use_safetensors=True,
                                                 trust_remote_code=cfg.trust_remote_code).to(device).eval()
    if model.config.vocab_size < store.vocab_size:
        raise FramelmError(f"{model_dir}: vocab_size {model.config.vocab_size} is smaller than the run's "
                           f"{store.vocab_size}; it was not trained on this run's tokens")
    seq_len = cfg.seq_len or _trained_seq_len(cfg, run) or int(getattr(model.config, "max_position_embeddings", 1024))
    nll = document_nll(model, docs, store.eos_id, seq_len, cfg.batch_size, device)
    del model

    out = {}
    for name, hset in sets.items():
        nats = float(sum(nll[unique[doc.tobytes()]] for doc in hset.docs))
        out[name] = {"loss": nats / hset.n_tokens, "bpb": nats / math.log(2) / max(hset.n_bytes, 1),
                     "tokens": hset.n_tokens, "bytes": hset.n_bytes, "docs": len(hset.docs)}
    return out


# -- stage entry ----------------------------------------------------------------------------------

def evaluate_model(cfg: EvalConfig, run: RunDir) -> dict[str, Any]:
    """Evaluate one model; write RUN/eval/<name>/results.json and return headline numbers."""
    out_dir = run.path("eval", cfg.instance())
    model_dir = resolve_model(cfg, run)
    tasks = resolve_tasks(cfg, run) if cfg.tasks else []
    device = str(resolve_device(cfg.device))  # a string: lm-eval's HFLM takes its device as one

    log.info("eval %s: %s on %s%d task(s)", cfg.instance(), model_dir, "held-out sets and " if cfg.heldout else "", len(tasks))
    results: dict[str, Any] = {"model": str(model_dir), "heldout": {}, "tasks": {}}
    if cfg.heldout:
        results["heldout"] = evaluate_heldout(model_dir, cfg, run, device)
    if tasks:
        config_dir = out_dir / "harness"
        datasets_cache = out_dir / "datasets-cache"  # lm-eval's json loader caches here; removed after
        write_task_configs(tasks, config_dir, datasets_cache)
        try:
            results["tasks"] = run_harness(model_dir, tasks, config_dir, device=device, dtype=cfg.dtype,
                                           batch_size=cfg.batch_size, limit=cfg.limit,
                                           trust_remote_code=cfg.trust_remote_code)
        finally:
            shutil.rmtree(datasets_cache, ignore_errors=True)
        for t in tasks:
            results["tasks"][t.name]["file"] = str(t.path)
    fsutil.write_json(out_dir / "results.json", results)

    counts: dict[str, Any] = {"tasks": len(tasks)}
    if cfg.heldout:
        counts["heldout_loss"] = round(results["heldout"]["all"]["loss"], 4)
        counts["heldout_tokens"] = results["heldout"]["all"]["tokens"]
    for name, metrics in results["tasks"].items():
        if metrics.get("acc") is not None:
            counts[f"{name}_acc"] = round(metrics["acc"], 4)
    return counts
