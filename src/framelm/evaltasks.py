"""Downstream tasks: check local JSON-lines task files, turn them into lm-evaluation-harness
task configs, and run them through `lm_eval.simple_evaluate` with the "hf" model.

Three row schemas are understood (those of ../shared/data/eval, see its README):

- multiple choice  `{"query", "choices": [...], "gold": int}`, plus an optional `"subject"`
  (MMLU): each choice is scored as a continuation of the query; acc and acc_norm (the harness
  normalises the log-likelihood by the choice's length in characters). Rows with a subject get
  an MMLU prompt: subject line, question, lettered choices, "Answer:", and the letters as choices.
- winogrande  `{"context_options": [a, b], "continuation", "gold": int}`: partial scoring, as
  lm-eval's own winogrande task does it: the contexts are the choices (doc_to_choice), the gold
  index is returned by doc_to_text, and the shared continuation is the target.
- lambada  `{"context", "continuation"}`: log-likelihood of the last word; acc is "greedy
  decoding reproduces it", plus perplexity.

Choices and continuations are joined to their context with one space, unless every choice of
the file starts with whitespace (the built-in code tasks carry their own newline), in which
case they are joined verbatim.

Reads: the task files. Writes: one `<task>.yaml` per task into the folder it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.progress import quiet

log = logging.getLogger("framelm")

MULTIPLE_CHOICE, WINOGRANDE, LAMBADA = "multiple_choice", "winogrande", "lambada"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The MMLU prompt, worded as lm-eval's mmlu task (tasks/mmlu/default: its per-subject description,
# then the template's question, lettered choices, "Answer:"), so that scores compare with its.
MMLU_TEXT = (
    "The following are multiple choice questions (with answers) about {{ subject | replace('_', ' ') }}.\n\n"
    "{{ query | trim }}\n"
    "{% for choice in choices %}{{ '" + LETTERS + "'[loop.index0] }}. {{ choice }}\n{% endfor %}"
    "Answer:"
)
MMLU_CHOICES = "{{ ('" + LETTERS + "'[:choices | length]) | list }}"

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_PERPLEXITY = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """A checked task file: its harness task name, path, schema and row count."""

    name: str
    path: Path
    schema: str
    rows: int
    subject: bool = False  # multiple choice rows carry an MMLU "subject"
    verbatim: bool = False  # every choice starts with whitespace: join without a space


def task_name(path: Path) -> str:
    """A harness task name from a file name: `arc_easy.jsonl` -> `arc_easy`."""
    stem = path.name.split(".")[0]
    return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "task"


def _schema_of(row: dict[str, Any]) -> str | None:
    if "context_options" in row:
        return WINOGRANDE
    if "choices" in row:
        return MULTIPLE_CHOICE
    if "context" in row:
        return LAMBADA
    return None


def _check_row(row: Any, schema: str, where: str) -> None:
    """Raise FramelmError naming the file, line and field if `row` breaks `schema`."""
    if not isinstance(row, dict):
        raise FramelmError(f"{where}: expected a JSON object, got {type(row).__name__}")

    def need(key: str, kind: type, what: str) -> Any:
        if key not in row:
            raise FramelmError(f"{where}: missing field '{key}' ({what}) required by the {schema} schema")
        value = row[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise FramelmError(f"{where}: field '{key}' must be {what}, got {type(value).__name__}: {value!r:.80}")
        return value

    if schema == LAMBADA:
        need("context", str, "a string")
        if not need("continuation", str, "a non-empty string").strip():
            raise FramelmError(f"{where}: field 'continuation' is empty")
        return
    options_key = "context_options" if schema == WINOGRANDE else "choices"
    options = need(options_key, list, "a list of at least two strings")
    if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise FramelmError(f"{where}: field '{options_key}' must list at least two non-empty strings, got {options!r:.120}")
    gold = need("gold", int, "an integer index into " + options_key)
    if not 0 <= gold < len(options):
        raise FramelmError(f"{where}: field 'gold' = {gold} is outside 0..{len(options) - 1} ({len(options)} {options_key})")
    if schema == WINOGRANDE:
        need("continuation", str, "a string")
    else:
        need("query", str, "a string")
        if "subject" in row:
            need("subject", str, "a string")


def check_task_file(path: str | Path, name: str | None = None) -> TaskFile:
    """Read every row of a task file and check it against the schema of its first row."""
    path = Path(path)
    if not path.is_file():
        raise FramelmError(f"task file not found: {path}")
    schema = None
    rows = 0
    subject = 0
    verbatim = True
    with open(path, "rb") as fh:  # decoded line by line, so that a bad byte is reported with its line
        for line_no, raw in enumerate(fh, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FramelmError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                   f"task files are UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FramelmError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if schema is None:
                schema = _schema_of(row) if isinstance(row, dict) else None
                if schema is None:
                    raise FramelmError(
                        f"{where}: cannot tell the task schema; rows need 'query'+'choices'+'gold' (multiple choice), "
                        f"'context_options'+'continuation'+'gold' (winogrande) or 'context'+'continuation' (lambada)"
                    )
            _check_row(row, schema, where)
            rows += 1
            if schema == MULTIPLE_CHOICE:  # only these rows can be MMLU's; a "subject" elsewhere is ignored
                subject += "subject" in row
                verbatim = verbatim and all(c[:1].isspace() for c in row["choices"])
    if schema is None:
        raise FramelmError(f"{path}: the task file has no rows")
    if subject not in (0, rows):
        raise FramelmError(f"{path}: {subject} of {rows} rows have a 'subject'; either all rows (MMLU) or none")
    # MMLU rows score letters, not their choices: how the choices begin says nothing of the join
    return TaskFile(name or task_name(path), path.resolve(), schema, rows,
                    subject=bool(subject), verbatim=schema == MULTIPLE_CHOICE and verbatim and not subject)


def harness_config(task: TaskFile, datasets_cache: Path) -> dict[str, Any]:
    """The lm-eval task config (what its YAML files hold) for one local task file."""
    cfg: dict[str, Any] = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task.path)}, "cache_dir": str(datasets_cache)},
        "test_split": "test",
        "target_delimiter": "" if task.verbatim else " ",
        "metadata": {"version": 1.0, "framelm_schema": task.schema},
    }
    if task.schema == LAMBADA:
        # The harness applies no target_delimiter to loglikelihood requests: the space goes in the target.
        cfg.update(output_type="loglikelihood", doc_to_text="context", doc_to_target="{{ ' ' + continuation }}",
                   target_delimiter="", metric_list=[_PERPLEXITY, _ACC])
    elif task.schema == WINOGRANDE:
        # doc_to_text returning the gold index (an int) is lm-eval's signal for partial scoring.
        cfg.update(output_type="multiple_choice", doc_to_text="gold", doc_to_choice="context_options",
                   doc_to_target="continuation", metric_list=[_ACC])
    elif task.subject:
        cfg.update(output_type="multiple_choice", doc_to_text=MMLU_TEXT, doc_to_choice=MMLU_CHOICES,
                   doc_to_target="gold", metric_list=[_ACC, _ACC_NORM])
    else:
        cfg.update(output_type="multiple_choice", doc_to_text="query", doc_to_choice="choices",
                   doc_to_target="gold", metric_list=[_ACC, _ACC_NORM])
    return cfg


def write_task_configs(tasks: list[TaskFile], out_dir: Path, datasets_cache: Path) -> list[Path]:
    """Write one lm-eval YAML per task into `out_dir`; return their paths."""
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FramelmError(f"two task files map to the same task name {dupes[0]!r}: "
                           f"{[str(t.path) for t in tasks if t.name == dupes[0]]}; rename one of them")
    paths = []
    for t in tasks:
        p = out_dir / f"{t.name}.yaml"
        fsutil.write_yaml(p, harness_config(t, datasets_cache))
        paths.append(p)
    return paths


def _continuations(task: TaskFile, limit: int | None) -> Iterator[tuple[int, str]]:
    """(line number, scored continuation) of the first `limit` rows, as the harness will join them."""
    if task.subject:  # MMLU scores single letters
        return
    delimiter = "" if task.verbatim else " "
    rows = 0
    with open(task.path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and rows == limit:
                return
            rows += 1
            row = json.loads(line)
            if task.schema == MULTIPLE_CHOICE:
                for choice in row["choices"]:
                    yield line_no, delimiter + choice
            else:
                yield line_no, " " + row["continuation"]


def check_lengths(model_dir: Path, tasks: list[TaskFile], limit: int | None, *, trust_remote_code: bool = False) -> None:
    """Refuse continuations longer than the model's context, which the harness cannot score
    (it truncates contexts from the left, but a continuation must fit whole: it asserts
    len(continuation) <= max_length, so exactly max_len tokens still fits)."""
    from transformers import AutoConfig, AutoTokenizer

    # trust_remote_code as HFLM gets it: a model with its own code has a config class of its own
    max_len = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code),
                      "max_position_embeddings", None)
    if not max_len:
        return
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    for task in tasks:
        scored = list(_continuations(task, limit))
        if not scored:
            continue
        # Counted alone, where the harness counts the tail of context + continuation tokenised
        # whole. The two agree for byte-level BPE (framelm's own tokenizer), whose pre-tokeniser
        # splits before the whitespace that joins them; a tokenizer that prefixes a lone string
        # (SentencePiece's "▁") counts one more alone, so this errs towards refusing.
        lengths = [len(ids) for ids in tokenizer([text for _, text in scored], add_special_tokens=False)["input_ids"]]
        worst = max(range(len(scored)), key=lengths.__getitem__)
        if lengths[worst] > max_len:
            raise FramelmError(
                f"{task.path}:{scored[worst][0]}: a scored continuation is {lengths[worst]} tokens, but {model_dir} "
                f"reads at most {max_len} (max_position_embeddings); drop this task or evaluate a longer-context model"
            )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No network while the harness runs: every file it needs is local.

    `datasets` sends a download-count request to S3 each time it builds a packaged loader (the
    "json" one of every task), even for local files, unless the Hub is offline; its failure is
    swallowed, so without a network it only costs a timeout per task. The flags are read at
    call time from these module attributes (the environment variables are read only at import).
    """
    import datasets.config
    import huggingface_hub.constants

    saved = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    values = [getattr(module, name) for module, name in saved]
    try:
        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for (module, name), value in zip(saved, values):
            setattr(module, name, value)


@contextlib.contextmanager
def _harness_quieted() -> Iterator[None]:
    """Keep lm-evaluation-harness's own chatter out of framelm's output during one evaluation."""
    import lm_eval.evaluator

    # The harness warns once per request whose context it left-truncates; that is expected for
    # small proxies with short windows and would bury framelm's own output. Under --quiet the
    # libraries it drives (model loading, dataset building) keep to errors too.
    names = ["lm_eval"] + ([] if log.isEnabledFor(logging.INFO) else ["transformers", "datasets"])
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    # simple_evaluate records `git describe` of the working directory in its results, which
    # framelm does not use; outside a repository git prints "fatal: not a git repository".
    git_hash = lm_eval.evaluator.get_git_commit_hash
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        lm_eval.evaluator.get_git_commit_hash = lambda: None
        # it print()s "bootstrapping for stddev: ..." to stdout, where framelm's tables go
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_harness(model_dir: Path, tasks: list[TaskFile], config_dir: Path, *, device: str, dtype: str,
                batch_size: int, limit: int | None, trust_remote_code: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate `model_dir` on `tasks` (configs already in `config_dir`); metrics per task.

    Each task's entry has the harness metrics without their filter suffix (`acc`, `acc_stderr`,
    `acc_norm`, ...), `n` (rows scored) and `schema`.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_lengths(model_dir, tasks, limit, trust_remote_code=trust_remote_code)
    with _harness_quieted(), _offline():
        manager = TaskManager(include_path=str(config_dir), include_defaults=False)
        model = HFLM(pretrained=str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                     device=device, batch_size=batch_size)
        # HFLM's "Tokenizing inputs" and "Running loglikelihood requests" bars pass tqdm an
        # explicit disable=, which overrides TQDM_DISABLE (what --quiet sets); HFLM's own switch
        # is disable_tqdm. Every framelm task config issues loglikelihood requests only.
        if quiet():
            model.loglikelihood = functools.partial(model.loglikelihood, disable_tqdm=True)
        out = lm_eval.simple_evaluate(
            model=model,
            tasks=[t.name for t in tasks],
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
        )
    results: dict[str, dict[str, Any]] = {}
    for t in tasks:
        raw = out["results"][t.name]
        metrics: dict[str, Any] = {"schema": t.schema}
        for key, value in raw.items():
            metric, _, filt = key.partition(",")
            if filt == "none":
                metrics[metric] = None if value == "N/A" else float(value)
        metrics["n"] = int(out["n-samples"][t.name]["effective"])
        results[t.name] = metrics
    return results
