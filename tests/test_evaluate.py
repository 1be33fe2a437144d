"""framelm.evaluate / evaltasks / builtin_tasks against numbers computed directly with transformers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from framelm import fsutil
from framelm.builtin_tasks import LAST_WORD, NEXT_LINE, write_builtin_tasks
from framelm.errors import FramelmError
from framelm.evaltasks import check_task_file, harness_config, run_harness, write_task_configs
from framelm.evaluate import EvalConfig, evaluate_heldout
from framelm.labels import write_labels
from framelm.pipeline import run_stage
from framelm.rundir import RunDir

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "Return the sum of two numbers.\n\nRaises ValueError when the input is empty.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with a byte-level BPE tokenizer, saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so choices differ clearly
        model.lm_head.weight.normal_(0, 2.0)
    path = tmp_path_factory.mktemp("model") / "hf"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def loglikelihood(model_dir: Path, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) and whether greedy decoding reproduces it, the harness's way:
    encode context+continuation together and split at the context's token count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    rows = logp[len(ctx) - 1:]
    ll = sum(float(rows[i, t]) for i, t in enumerate(cont))
    greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(cont))
    return ll, greedy


def mean_stderr(x: list[float]) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [{"query": f"The quick brown {w}", "choices": ["fox jumps", "dog", "lazy over the"], "gold": i % 3}
           for i, w in enumerate(["cat", "fox", "dog", "sum", "copy"])] + [
    # acc_norm picks "dog" here only when a log-likelihood is divided by its choice's length without the space
    {"query": "The quick brown cat", "choices": ["a", "b", "dog"], "gold": 2}]
MMLU_ROWS = [{"query": q, "choices": ["sum", "copy", "dog", "fox"], "gold": g, "subject": "high_school_math"}
             for q, g in (("What is a + b?", 0), ("What does a copy return?", 1), ("Which animal jumps?", 2))]
# golds chosen so that the fixture model gets some rows right and some wrong (the tests check it)
WG_ROWS = [{"context_options": ["Return the sum", "Permission is"], "continuation": "of two numbers.", "gold": 1},
           {"context_options": ["The lazy dog", "def add(a"], "continuation": "jumps over the fox", "gold": 1},
           {"context_options": ["free of charge", "the input is"], "continuation": "empty.", "gold": 1}]
LAMBADA_ROWS = [{"context": "The quick brown fox jumps over the lazy", "continuation": "dog"},
                {"context": "Raises ValueError when the input is", "continuation": "empty"},
                {"context": "free of", "continuation": "charge"},
                {"context": "Return quick", "continuation": "t"}]  # the fixture model's greedy continuation


@pytest.fixture(scope="module")
def harness_results(model_dir, tmp_path_factory):
    """One harness run over a task file of each schema."""
    root = tmp_path_factory.mktemp("tasks")
    files = {name: write_jsonl(root / f"{name}.jsonl", rows) for name, rows in
             [("mc", MC_ROWS), ("mmlu", MMLU_ROWS), ("wg", WG_ROWS), ("lam", LAMBADA_ROWS)]}
    tasks = [check_task_file(p) for p in files.values()]
    write_task_configs(tasks, root / "yaml", root / "cache")
    return run_harness(model_dir, tasks, root / "yaml", device="cpu", dtype="float32", batch_size=4, limit=None)


def test_multiple_choice_matches_hand_computed_loglikelihoods(model_dir, harness_results):
    acc, acc_norm, acc_norm_with_space = [], [], []
    for row in MC_ROWS:
        lls = np.array([loglikelihood(model_dir, row["query"], " " + c)[0] for c in row["choices"]])
        # acc_norm: log-likelihood per character of the choice as the file gives it (the joining space not counted)
        lengths = np.array([len(c) for c in row["choices"]])
        acc.append(float(lls.argmax() == row["gold"]))
        acc_norm.append(float((lls / lengths).argmax() == row["gold"]))
        acc_norm_with_space.append(float((lls / (lengths + 1)).argmax() == row["gold"]))
    got = harness_results["mc"]
    assert got["n"] == len(MC_ROWS) and got["schema"] == "multiple_choice"
    assert got["acc"] == pytest.approx(np.mean(acc)) and got["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert got["acc_stderr"] == pytest.approx(mean_stderr(acc))
    assert got["acc_norm_stderr"] == pytest.approx(mean_stderr(acc_norm))
    assert 0 < np.mean(acc) < 1, "fixture must give a non-trivial accuracy so the comparison can fail"
    assert acc_norm != acc_norm_with_space, "fixture must tell the two length normalisations apart"


def mmlu_prompt(row: dict) -> str:
    # lm-eval's mmlu task: the description of tasks/mmlu/default/mmlu_<subject>.yaml, then its template
    return (f"The following are multiple choice questions (with answers) about high school math.\n\n{row['query']}\n"
            "A. sum\nB. copy\nC. dog\nD. fox\nAnswer:")


def test_mmlu_rows_get_a_lettered_prompt(model_dir, harness_results, tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    path = write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)
    write_task_configs([check_task_file(path)], tmp_path / "yaml", tmp_path / "cache")
    task = get_task_dict(["mmlu"], TaskManager(include_path=str(tmp_path / "yaml"), include_defaults=False))["mmlu"]
    docs = list(task.test_docs())
    assert [task.doc_to_text(d) for d in docs] == [mmlu_prompt(r) for r in MMLU_ROWS]
    assert all(task.doc_to_choice(d) == list("ABCD") for d in docs)

    acc = []
    for row in MMLU_ROWS:
        lls = [loglikelihood(model_dir, mmlu_prompt(row), " " + letter)[0] for letter in "ABCD"]
        acc.append(float(np.argmax(lls) == row["gold"]))
    assert harness_results["mmlu"]["acc"] == pytest.approx(np.mean(acc))
    assert 0 < np.mean(acc) < 1, "fixture must give a non-trivial accuracy so the comparison can fail"


def test_winogrande_partial_scoring(model_dir, harness_results):
    acc = []
    for row in WG_ROWS:
        lls = [loglikelihood(model_dir, ctx, " " + row["continuation"])[0] for ctx in row["context_options"]]
        acc.append(float(np.argmax(lls) == row["gold"]))
    assert harness_results["wg"]["acc"] == pytest.approx(np.mean(acc))
    assert harness_results["wg"]["n"] == 3
    assert 0 < np.mean(acc) < 1, "fixture must give a non-trivial accuracy so the comparison can fail"


def test_lambada_accuracy_and_perplexity(model_dir, harness_results):
    scored = [loglikelihood(model_dir, r["context"], " " + r["continuation"]) for r in LAMBADA_ROWS]
    got = harness_results["lam"]
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in scored])), rel=1e-5)
    assert got["acc"] == pytest.approx(np.mean([g for _, g in scored]))
    assert 0 < np.mean([g for _, g in scored]) < 1, "fixture must give a non-trivial accuracy so the comparison can fail"


def test_generated_yaml_loads_offline(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    path = write_jsonl(tmp_path / "wino.jsonl", WG_ROWS)
    write_task_configs([check_task_file(path)], tmp_path / "yaml", tmp_path / "cache")
    task = get_task_dict(["wino"], TaskManager(include_path=str(tmp_path / "yaml"), include_defaults=False))["wino"]
    docs = list(task.test_docs())
    assert len(docs) == 3 and task.doc_to_choice(docs[0]) == WG_ROWS[0]["context_options"]
    assert task.multiple_input == 2  # partial scoring: contexts are the choices


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "'gold' = 2 is outside 0..1"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "at least two"),
    ('{"query": "q", "choices": ["a", "b"]}', "missing field 'gold'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 0', "invalid JSON"),
    ('{"question": "q"}', "missing field 'choices'"),
])
def test_bad_task_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(FramelmError, match=message) as info:
        check_task_file(path)
    assert f"{path}:2" in str(info.value)


def test_a_task_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(FramelmError, match=rf"{path}:2: not UTF-8 \(byte 0xe9 at column 15\)"):
        check_task_file(path)


def test_unknown_schema_and_mixed_subjects_are_refused(tmp_path):
    with pytest.raises(FramelmError, match="cannot tell the task schema"):
        check_task_file(write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(FramelmError, match="1 of 2 rows have a 'subject'"):
        check_task_file(write_jsonl(tmp_path / "b.jsonl", [MMLU_ROWS[0], MC_ROWS[0]]))


def test_continuation_longer_than_the_model_context_is_refused(model_dir, tmp_path):
    long_choice = "".join(chr(0x4E00 + i) for i in range(300))  # unseen characters: 3 byte tokens each
    path = write_jsonl(tmp_path / "long.jsonl", MC_ROWS[:2] + [{"query": "q", "choices": ["a", long_choice], "gold": 0}])
    task = check_task_file(path)
    write_task_configs([task], tmp_path / "yaml", tmp_path / "cache")
    with pytest.raises(FramelmError, match=r"long.jsonl:3: a scored continuation is \d+ tokens, but .* at most 512"):
        run_harness(model_dir, [task], tmp_path / "yaml", device="cpu", dtype="float32", batch_size=4, limit=None)


def test_a_continuation_of_exactly_the_model_context_is_scored(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from framelm.evaltasks import check_lengths

    tok = AutoTokenizer.from_pretrained(model_dir)
    cjk = "".join(chr(0x4E00 + i) for i in range(170))  # unseen characters: 3 byte tokens each

    def scored_tokens(query: str, choice: str) -> int:  # as the harness splits the pair
        return len(tok.encode(query + " " + choice, add_special_tokens=False)) - len(tok.encode(query, add_special_tokens=False))

    fits, too_long = cjk + "a", cjk + "aa"
    assert scored_tokens("q", fits) == 512 and scored_tokens("q", too_long) == 513  # max_position_embeddings 512
    task = check_task_file(write_jsonl(tmp_path / "edge.jsonl", [{"query": "q", "choices": ["a", fits], "gold": 0}]))
    write_task_configs([task], tmp_path / "yaml", tmp_path / "cache")
    got = run_harness(model_dir, [task], tmp_path / "yaml", device="cpu", dtype="float32", batch_size=4, limit=None)
    assert got["edge"]["n"] == 1  # the harness scores it
    longer = check_task_file(write_jsonl(tmp_path / "longer.jsonl", [{"query": "q", "choices": ["a", too_long], "gold": 0}]))
    with pytest.raises(FramelmError, match=r"longer.jsonl:1: a scored continuation is 513 tokens, but .* at most 512"):
        check_lengths(model_dir, [longer], None)


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_the_harness_progress_bars(model_dir, tmp_path, capsys, monkeypatch, quiet):
    """--quiet sets TQDM_DISABLE=1; the harness passes its bars an explicit disable=, which tqdm's
    environment variable does not override, so framelm has to switch them off itself."""
    if quiet:
        monkeypatch.setenv("TQDM_DISABLE", "1")
    else:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    task = check_task_file(write_jsonl(tmp_path / "lam.jsonl", LAMBADA_ROWS))
    write_task_configs([task], tmp_path / "yaml", tmp_path / "cache")
    run_harness(model_dir, [task], tmp_path / "yaml", device="cpu", dtype="float32", batch_size=4, limit=None)
    err = capsys.readouterr().err
    for bar in ("Tokenizing inputs", "Running loglikelihood requests"):
        assert (bar in err) is not quiet, bar


def test_a_results_folder_inside_eval_tasks_is_refused(run, tmp_path):
    from framelm.config import ConfigError

    builtin = run.path("eval", "tasks", "rows500-seed0", "next_line.jsonl")
    builtin.parent.mkdir(parents=True)
    builtin.write_text("{}\n")
    for cfg in (EvalConfig(model=str(tmp_path / "tasks"), tasks=["builtin"]),  # a model folder named tasks
                EvalConfig(model="train/tasks/seed0", tasks=["builtin"]),  # a schedule named tasks
                EvalConfig(model="train/frame/seed0", name="tasks/mine", tasks=["builtin"])):
        with pytest.raises(ConfigError, match=r"puts results in RUN/eval/tasks.*set 'name'"):
            run_stage("eval", cfg, run)
    assert builtin.read_text() == "{}\n"  # run_stage did not clear RUN/eval/tasks
    with pytest.raises(ConfigError, match=r"the name derived from 'model' = 'train/tasks/seed0/hf-avg' puts results "
                                          r"in RUN/eval/tasks/seed0-avg"):
        EvalConfig.from_dict({"model": "train/tasks/seed0/hf-avg"})
    assert EvalConfig.from_dict({"model": "train/tasks/seed0", "name": "tasks-model"}).instance() == "tasks-model"


def test_a_subject_marks_only_multiple_choice_rows_as_mmlu(model_dir, tmp_path):
    from framelm.evaltasks import check_lengths

    long_word = "".join(chr(0x4E00 + i) for i in range(300))  # unseen characters: 3 byte tokens each
    lam = check_task_file(write_jsonl(tmp_path / "lam.jsonl", [{**LAMBADA_ROWS[0], "continuation": long_word, "subject": "x"}]))
    assert lam.schema == "lambada" and not lam.subject
    with pytest.raises(FramelmError, match=r"lam.jsonl:1: a scored continuation is \d+ tokens"):  # still length-checked
        check_lengths(model_dir, [lam], None)
    assert not check_task_file(write_jsonl(tmp_path / "wg.jsonl", [{**WG_ROWS[0], "subject": "x"}, WG_ROWS[1]])).subject


def test_shared_eval_files_are_recognised(shared_data):
    expected = {"lambada_openai": "lambada", "winogrande": "winogrande"}
    paths = sorted((shared_data / "eval").glob("*.jsonl"))
    assert {"mmlu", "winogrande", "lambada_openai"} <= {p.stem for p in paths}, f"eval files missing from {shared_data / 'eval'}"
    for path in paths:
        task = check_task_file(path)
        assert task.schema == expected.get(task.name, "multiple_choice"), path
        assert task.subject == (task.name == "mmlu") and not task.verbatim and task.rows > 0


def test_unknown_task_names_and_missing_weights_are_explained(model_dir, tmp_path):
    from framelm.evaluate import resolve_model, resolve_tasks

    run = RunDir(tmp_path / "run")
    with pytest.raises(FramelmError, match=r"'piqa' is neither a task file nor a task name \(task_dir is"):
        resolve_tasks(EvalConfig(tasks=["piqa"], task_dir=str(tmp_path)), run)
    unsafe = tmp_path / "pickled"
    shutil.copytree(model_dir, unsafe, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FramelmError, match="no \\*.safetensors weights"):
        resolve_model(EvalConfig(model=str(unsafe)), run)


def test_editing_a_task_file_or_the_model_changes_the_stage_hash(model_dir, tmp_path):
    from framelm.pipeline import stage_hash

    run = RunDir(tmp_path / "run")
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    path = write_jsonl(tmp_path / "copa.jsonl", MC_ROWS)
    by_path = EvalConfig(model=str(model), tasks=[str(path)], heldout=False)
    by_name = EvalConfig(model=str(model), tasks=["copa"], task_dir=str(tmp_path), heldout=False)

    def hashes():
        return [stage_hash("eval", cfg, run, dry_run=True)[0] for cfg in (by_path, by_name)]

    before = hashes()
    write_jsonl(path, MC_ROWS[:2])
    edited_task = hashes()
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # same size, other last weights
    edited_model = hashes()
    assert len({*before, *edited_task, *edited_model}) == 6
    assert EvalConfig(model="train/frame/seed0", tasks=[str(path)]).upstream() == ("train/frame/seed0", "tokenize")


# -- a fabricated run directory: ingest documents and a token store ------------------------------

DOCS = [  # id, source, split, text
    ("a1", "code", "heldout", "import os\nimport sys\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    return path\n"),
    ("a2", "code", "heldout", "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, item):\n        self.items.append(item)\n"),
    # a paragraph whose last word is wrapped onto a line of its own
    ("a3", "docs", "heldout", "Return the sum of two numbers and check both of the given inputs\nfirst.\n\n"
                              "This function raises an error when either of the given values is missing entirely."),
    ("a4", "licence", "heldout", "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.\n"
                                 "The above copyright notice shall be included in all copies or substantial portions."),
    ("t1", "code", "train", "TRAINING ONLY line one\nTRAINING ONLY line two\nTRAINING ONLY line three\n"),
]


@pytest.fixture
def run(tmp_path, model_dir) -> RunDir:
    from transformers import AutoTokenizer

    run = RunDir(tmp_path / "run")
    table = pa.table({"id": [d[0] for d in DOCS], "source": [d[1] for d in DOCS], "split": [d[2] for d in DOCS],
                      "text": [d[3] for d in DOCS]})
    run.path("ingest", "documents").mkdir(parents=True)
    pq.write_table(table, run.path("ingest", "documents", "part-00000.parquet"))
    fsutil.mark_done(run.path("ingest", "documents", "part-00000.parquet"))  # shard markers sit beside the shards
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, offsets, flat = [], [], []
    for _, _, _, text in DOCS:
        t = tok.encode(text)
        offsets.append(len(flat))
        ids.append(len(t))
        flat += t + [tok.eos_token_id]
    tok_dir = run.path("tokenize")
    tok_dir.mkdir()
    np.array(flat, dtype=np.uint16).tofile(tok_dir / "tokens.bin")
    pq.write_table(pa.table({"id": table["id"], "source": table["source"], "split": table["split"],
                             "offset": pa.array(offsets, pa.int64()), "n_tokens": pa.array(ids, pa.int64()),
                             "n_bytes": pa.array([len(d[3].encode()) for d in DOCS], pa.int64())}), tok_dir / "index.parquet")
    (tok_dir / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": len(tok), "eos_id": tok.eos_token_id,
                                                    "n_docs": len(DOCS), "n_tokens": len(flat)}))
    run.path("score").mkdir()
    pq.write_table(pa.table({"id": table["id"], "split": table["split"]}), run.path("score", "scores.parquet"))
    run.path("partition").mkdir()
    write_labels(run.path("partition", "quadrants.parquet"), run.path("score", "scores.parquet"),
                 [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)], [np.array([0, 1, 0, 3, 2])])
    for key in ("ingest", "tokenize"):
        run.update_record(key, {"status": "done", "hash": key})
    return run


def direct_nll(model_dir: Path, doc: list[int], eos_id: int, seq_len: int) -> float:
    """Summed NLL of one document read after an EOS, one forward pass per window of seq_len predictions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seq = torch.tensor([eos_id] + doc)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(doc), seq_len):
            x, y = seq[start:start + seq_len], seq[start + 1:start + seq_len + 1]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            total -= float(logp[torch.arange(len(y)), y].sum())
    return total


@pytest.mark.parametrize("seq_len", [512, 7])
def test_heldout_loss_per_source_and_quadrant(run, model_dir, seq_len):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    heldout = {d[0]: d for d in DOCS if d[2] == "heldout"}
    tokens = {i: tok.encode(d[3]) for i, d in heldout.items()}
    nll = {i: direct_nll(model_dir, t, tok.eos_token_id, seq_len) for i, t in tokens.items()}
    got = evaluate_heldout(model_dir, EvalConfig(model=str(model_dir), seq_len=seq_len, tasks=[]), run, "cpu")

    groups = {"all": list(heldout), "source/code": ["a1", "a2"], "source/docs": ["a3"], "source/licence": ["a4"],
              "quadrant/Q1": ["a1", "a3"], "quadrant/Q2": ["a2"], "quadrant/Q4": ["a4"]}
    assert set(got) == set(groups)  # the training document t1 is in no set
    for name, ids in groups.items():
        n_tokens = sum(len(tokens[i]) for i in ids)
        n_bytes = sum(len(heldout[i][3].encode()) for i in ids)
        nats = sum(nll[i] for i in ids)
        assert got[name]["tokens"] == n_tokens and got[name]["bytes"] == n_bytes and got[name]["docs"] == len(ids)
        assert got[name]["loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
        assert got[name]["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_a_trained_model_is_read_in_windows_of_its_training_rows(run, model_dir):
    """A training key's held-out windows default to train.seq_len, as the trainer logs them and
    `framelm compare` evaluates them, not to the exported max_position_embeddings (the preset's)."""
    from framelm.evaluate import resolve_model

    shutil.copytree(model_dir, run.path("train", "frame", "seed0", "hf"))
    run.update_record("train/frame/seed0", {"status": "done", "hash": "t", "config": {"seq_len": 7}})
    cfg = EvalConfig(model="train/frame/seed0", tasks=[])
    got = evaluate_heldout(resolve_model(cfg, run), cfg, run, "cpu")["all"]["loss"]
    as_trained = evaluate_heldout(model_dir, EvalConfig(model=str(model_dir), seq_len=7, tasks=[]), run, "cpu")
    whole = evaluate_heldout(model_dir, EvalConfig(model=str(model_dir), tasks=[]), run, "cpu")  # 512
    assert got == pytest.approx(as_trained["all"]["loss"], rel=1e-6)
    assert abs(got - whole["all"]["loss"]) > 1e-3, "fixture documents must be longer than 7 tokens"


def test_heldout_refuses_a_model_with_another_tokenizer(run, model_dir, tmp_path):
    other = tmp_path / "tokenizer"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    shutil.copytree(other, run.path("tokenize", "tokenizer"))
    with pytest.raises(FramelmError, match="another tokenizer"):
        evaluate_heldout(model_dir, EvalConfig(model=str(model_dir), tasks=[]), run, "cpu")


def test_builtin_tasks_are_deterministic_and_heldout_only(run):
    paths = write_builtin_tasks(run, rows=50, seed=3)
    first = {p.name: p.read_bytes() for p in paths}
    assert sorted(first) == sorted([NEXT_LINE + ".jsonl", LAST_WORD + ".jsonl"])
    assert {p.name: p.read_bytes() for p in write_builtin_tasks(run, rows=50, seed=3)} == first
    assert {p.name: p.read_bytes() for p in write_builtin_tasks(run, rows=50, seed=4)} != first
    texts = {d[0]: d[3] for d in DOCS}
    for p in paths:
        task = check_task_file(p)
        assert task.rows > 0 and "TRAINING ONLY" not in p.read_text()
        for row in map(json.loads, p.read_text().splitlines()):
            doc = texts[row["doc_id"]]
            if task.schema == "multiple_choice":
                assert task.verbatim  # choices carry their own newline
                assert row["query"] + row["choices"][row["gold"]] in doc
                assert sum(c in "\n" + doc for c in row["choices"]) == 1
            else:
                # the harness joins them with one space: that must be the document's own text
                assert doc.startswith(row["context"] + " " + row["continuation"]) and row["continuation"].isalpha()


@pytest.mark.slow
def test_eval_stage_end_to_end(run, model_dir):
    cfg = EvalConfig(model=str(model_dir), name="tiny", tasks=["builtin"], builtin_rows=6, device="cpu")
    counts = run_stage("eval", cfg, run)
    results = json.loads(run.path("eval", "tiny", "results.json").read_text())
    assert set(results["tasks"]) == {NEXT_LINE, LAST_WORD}
    for metrics in results["tasks"].values():
        assert metrics["n"] == check_task_file(metrics["file"]).rows > 0 and metrics["acc_stderr"] is not None
    assert results["tasks"][NEXT_LINE]["n"] == 6
    assert results["tasks"][NEXT_LINE]["acc_norm"] is not None
    assert results["heldout"]["all"]["tokens"] == counts["heldout_tokens"]
    assert not run.path("eval", "tiny", "datasets-cache").exists()
    started = run.record("eval/tiny")["started"]
    assert run_stage("eval", cfg, run) == counts
    assert run.record("eval/tiny")["started"] == started  # up to date: skipped, not run again to the same counts
    assert sorted(p.name for p in run.path("eval", "tiny").iterdir()) == [".framelm-hash", "harness", "results.json"]


def test_harness_keeps_stdout_clean_and_runs_no_git(model_dir, tmp_path, capsys, monkeypatch):
    import lm_eval.loggers.utils
    import subprocess

    calls = []
    real = subprocess.check_output
    monkeypatch.setattr(lm_eval.loggers.utils.subprocess, "check_output",
                        lambda cmd, *a, **kw: calls.append(cmd) or real(cmd, *a, **kw))
    task = check_task_file(write_jsonl(tmp_path / "lam.jsonl", LAMBADA_ROWS))
    write_task_configs([task], tmp_path / "yaml", tmp_path / "cache")
    got = run_harness(model_dir, [task], tmp_path / "yaml", device="cpu", dtype="float32", batch_size=4, limit=None)
    assert got["lam"]["perplexity"] > 0
    captured = capsys.readouterr()
    assert "bootstrapping" not in captured.out and "bootstrapping for stddev: perplexity" in captured.err
    assert not [c for c in calls if "git" in c]


def test_harness_opens_no_network_connection(model_dir, tmp_path, monkeypatch):
    """Task files and the model are local: nothing may be fetched or reported while they run
    (datasets counts loads of its packaged "json" loader with a request to S3 unless offline)."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during evaluation")

    import datasets.config
    import huggingface_hub.constants

    # as a user's shell has them: tests/conftest.py turns the Hub off for the whole suite
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *args: refuse(*args))
    monkeypatch.setattr(socket, "create_connection", refuse)
    task = check_task_file(write_jsonl(tmp_path / "copa.jsonl", MC_ROWS))
    write_task_configs([task], tmp_path / "yaml", tmp_path / "cache")
    got = run_harness(model_dir, [task], tmp_path / "yaml", device="cpu", dtype="float32", batch_size=4, limit=None)
    assert got["copa"]["n"] == len(MC_ROWS)
    assert attempts == []
    assert datasets.config.HF_UPDATE_DOWNLOAD_COUNTS and not huggingface_hub.constants.HF_HUB_OFFLINE, \
        "the offline switch must be undone after the harness"


def test_length_check_trusts_remote_code_as_the_harness_does(model_dir, tmp_path, monkeypatch):
    """A model shipping its own code needs trust_remote_code for its config and tokenizer too;
    the length check loads them before HFLM does, so it must pass the same switch."""
    import transformers

    from framelm.evaltasks import check_lengths

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _real=real, **kw: seen.append(kw.get("trust_remote_code")) or _real(*a, **kw))
    task = check_task_file(write_jsonl(tmp_path / "copa.jsonl", MC_ROWS))
    check_lengths(model_dir, [task], None, trust_remote_code=True)
    assert len(seen) >= 2 and all(seen), seen


def test_mmlu_letters_join_with_a_space_whatever_the_choices_begin_with(tmp_path):
    rows = [{**r, "choices": [" " + c for c in r["choices"]]} for r in MMLU_ROWS]
    task = check_task_file(write_jsonl(tmp_path / "mmlu.jsonl", rows))
    assert task.subject and not task.verbatim
    assert harness_config(task, tmp_path / "cache")["target_delimiter"] == " "  # "Answer: A", not "Answer:A"


def test_a_new_partition_makes_the_quadrant_losses_of_an_outside_model_stale(run, model_dir):
    """The held-out quadrant sets are read from RUN/partition, which is no upstream of evaluating
    a model given by path: the stage hash must follow it, or the old quadrants' losses are kept."""
    from framelm.pipeline import stage_hash

    cfg = EvalConfig(model=str(model_dir), tasks=[])
    before = stage_hash("eval", cfg, run)[0]
    assert stage_hash("eval", cfg, run)[0] == before
    write_labels(run.path("partition", "quadrants.parquet"), run.path("score", "scores.parquet"),
                 [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)], [np.array([3, 2, 1, 0, 0])])
    assert stage_hash("eval", cfg, run)[0] != before
