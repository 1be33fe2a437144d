"""The score stage end to end: values against transformers, resume after SIGKILL, ranks, Ray, errors."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from framelm import fsutil
from framelm.config import ConfigError
from framelm.errors import FramelmError
from framelm.pipeline import run_stage, stage_hash
from framelm.score import SCORES_SCHEMA, ScoreConfig, shard_path

from .conftest import CONTEXT, TEXTS, make_model, make_run

STRIDE = 8
SETTINGS = dict(context_tokens=CONTEXT, stride_tokens=STRIDE, docs_per_shard=3, tokens_per_batch=96)


def reference_nll(model_dir: Path, text: str) -> tuple[float, int]:
    """Summed NLL via the model's own loss on [bos] + tokens, windowed like the stage (fp32, CPU)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seq = [bos] + tok(text, add_special_tokens=False)["input_ids"]
    total, next_target, end = 0.0, 1, 0
    while next_target < len(seq):
        end = min(len(seq), CONTEXT if end == 0 else end + STRIDE)
        start = max(0, end - CONTEXT)
        ids = torch.tensor([seq[start:end]])
        labels = ids.clone()
        labels[0, : next_target - start] = -100  # only the new tokens are predicted here
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        total += loss * (end - next_target)
        next_target = end
    return total, len(seq) - 1


@pytest.fixture(scope="module")
def scored(ref_models, tmp_path_factory):
    """One uninterrupted single-process run; other tests compare against it."""
    run = make_run(tmp_path_factory.mktemp("run"), ref_models)
    counts = run_stage("score", ScoreConfig(**SETTINGS), run)
    return run, counts, pq.read_table(run.path("score", "scores.parquet"))


def test_scores_match_transformers_loss(scored, ref_models):
    run, counts, table = scored
    assert table.schema == SCORES_SCHEMA
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"doc-{i:03d}" for i in range(len(TEXTS))], "document order kept"
    assert counts["docs"] == len(TEXTS) and counts["shards"] == math.ceil(len(TEXTS) / 3)
    for r, text in zip(rows, TEXTS):
        assert r["n_tokens"] == len(text) // 3, "n_tokens comes from the tokenize index, joined by id"
        assert r["n_bytes"] == len(text.encode())
        if not text:
            continue
        assert r["status"] == "ok"
        for name in ("weak", "strong"):
            nll, n = reference_nll(ref_models[name], text)
            assert r[f"{name}_tokens"] == n
            assert r[f"{name}_nll"] == pytest.approx(nll, rel=1e-4)
            assert r[f"ppl_{name}"] == pytest.approx(math.exp(nll / n), rel=1e-4)
            assert r[f"bpb_{name}"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)
        assert r["pd"] == pytest.approx((r["ppl_weak"] - r["ppl_strong"]) / r["ppl_weak"], rel=1e-9)
        assert r["ppl"] == r["ppl_strong"]
    assert max(r["weak_tokens"] or 0 for r in rows) > 2 * CONTEXT, "a document needed several windows"
    assert any(r["weak_tokens"] != r["strong_tokens"] for r in rows if r["status"] == "ok"), "tokenizers differ"


def test_empty_document_gets_status_and_nulls(scored):
    _, counts, table = scored
    empty = [r for r in table.to_pylist() if r["status"] != "ok"]
    assert [r["id"] for r in empty] == ["doc-002"] and empty[0]["status"] == "empty"
    numeric = ["weak_nll", "weak_tokens", "strong_nll", "strong_tokens", "ppl_weak", "ppl_strong", "bpb_weak", "bpb_strong", "pd", "ppl"]
    assert all(empty[0][c] is None for c in numeric)
    assert counts["docs_empty"] == 1 and counts["docs_scored"] == len(TEXTS) - 1
    for c in numeric:  # NaN-free: numbers are finite or null
        values = table.column(c).drop_null().to_numpy()
        assert np.isfinite(values).all()


def test_run_writes_exactly_its_files(scored):
    run, _, _ = scored
    files = sorted(str(p.relative_to(run.path("score"))) for p in run.path("score").rglob("*") if p.is_file())
    shards = [f"shards/{name}" for k in range(4) for name in (f"part-{k:05d}.parquet", f".part-{k:05d}.parquet.done")]
    assert files == sorted([".framelm-hash", "precision.json", "scores.parquet", *shards])


def test_cli_weak_axis_and_rerun_is_a_no_op(scored, ref_models, tmp_path):
    from framelm.cli import main

    run, _, strong_axis = scored
    weak_run = make_run(tmp_path / "weak-axis", ref_models)
    flags = ["--context-tokens", str(CONTEXT), "--stride-tokens", str(STRIDE), "--docs-per-shard", "3", "--tokens-per-batch", "96"]
    assert main(["score", "--run-dir", str(weak_run.root), "--ppl-axis", "weak", "--quiet", *flags]) == 0
    table = pq.read_table(weak_run.path("score", "scores.parquet"))
    assert table.column("ppl").equals(table.column("ppl_weak"))
    assert table.column("ppl_strong").equals(strong_axis.column("ppl_strong"))
    mtime = run.path("score", "scores.parquet").stat().st_mtime_ns
    run_stage("score", ScoreConfig(**SETTINGS), run)  # same config: up to date, nothing rewritten
    assert run.path("score", "scores.parquet").stat().st_mtime_ns == mtime


def test_ranks_share_shards_and_last_one_merges(scored, ref_models, tmp_path):
    _, _, single = scored
    run = make_run(tmp_path / "run", ref_models)
    cfgs = [ScoreConfig(rank=r, world_size=2, **SETTINGS) for r in (0, 1)]
    assert cfgs[1].lock_name("score") == "score.rank1"
    first = run_stage("score", cfgs[0], run)
    assert first["_pending"] and not run.path("score", "scores.parquet").exists()
    assert sorted(p.name for p in run.path("score", "shards").glob("*.done")) == [".part-00000.parquet.done", ".part-00002.parquet.done"]
    assert run_stage("score", cfgs[1], run)["docs"] == len(TEXTS)
    assert run.record("score")["status"] == "done"
    assert pq.read_table(run.path("score", "scores.parquet")).equals(single)


def test_rank_defaults_come_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = ScoreConfig()
    assert (cfg.rank, cfg.world_size) == (3, 4)
    assert cfg.hashed_dict() == ScoreConfig(rank=0, world_size=1).hashed_dict(), "rank is an execution detail"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="rank"):
        ScoreConfig.from_dict({})


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(ref_models, tmp_path):
    texts = TEXTS
    settings = dict(SETTINGS, docs_per_shard=1)
    run = make_run(tmp_path / "killed", ref_models, texts)
    script = (
        "import sys; from framelm.pipeline import run_stage; from framelm.score import ScoreConfig; "
        f"run_stage('score', ScoreConfig(**{settings!r}), sys.argv[1])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(run.root)], env={**os.environ, "TQDM_DISABLE": "1"})
    shards = run.path("score", "shards")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not any(shards.glob("*.done")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(shards.glob("*.done")))
    assert 0 < done_at_kill < len(texts), f"the kill must land mid-run ({done_at_kill} of {len(texts)} shards done)"
    assert not run.path("score", "scores.parquet").exists()

    run_stage("score", ScoreConfig(**settings), run)
    fresh = make_run(tmp_path / "fresh", ref_models, texts)
    run_stage("score", ScoreConfig(**settings), fresh)
    resumed = pq.read_table(run.path("score", "scores.parquet"))
    assert resumed.num_rows == len(texts)
    assert resumed.equals(pq.read_table(fresh.path("score", "scores.parquet")))
    assert not list(run.path("score").rglob("*.tmp-*")), "no temporaries left behind"


@pytest.mark.slow
def test_ray_executor_writes_the_same_shards(scored, ref_models, tmp_path):
    ray = pytest.importorskip("ray")
    _, _, local = scored
    run = make_run(tmp_path / "run", ref_models)
    # One actor on as many cores as this process's torch threads: the same float sums, bit for bit.
    ray.init(num_cpus=torch.get_num_threads(), include_dashboard=False, log_to_driver=False)
    try:
        counts = run_stage("score", ScoreConfig(executor="ray", **SETTINGS), run)
    finally:
        ray.shutdown()
    assert counts["docs"] == len(TEXTS)
    assert all(fsutil.is_done(shard_path(run, k)) for k in range(counts["shards"]))
    assert pq.read_table(run.path("score", "scores.parquet")).equals(local)


def test_model_dir_without_weights_is_an_error(ref_models, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(ref_models["weak"], broken)
    (broken / "model.safetensors").unlink()
    run = make_run(tmp_path / "run", ref_models)
    with pytest.raises(FramelmError, match="no-weights.*safetensors"):
        run_stage("score", ScoreConfig(weak_model=str(broken), **SETTINGS), run)
    assert not run.path("score", "scores.parquet").exists()


def test_tokenizer_without_bos_or_eos_is_an_error(ref_models, tmp_path):
    model = make_model(tmp_path / "nospecial", seed=3, vocab_size=280, bos=None, eos=None, layers=1)
    run = make_run(tmp_path / "run", ref_models)
    cfg = ScoreConfig(strong_model=str(model), **SETTINGS)
    assert cfg.upstream() == ("tokenize", "refmodels"), "the weak model still comes from refmodels"
    with pytest.raises(FramelmError, match="neither a BOS nor an EOS"):
        run_stage("score", cfg, run)


def test_out_of_memory_suggests_smaller_batches(ref_models, tmp_path, monkeypatch):
    from framelm.scoring import scorer

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(scorer.F, "cross_entropy", oom)
    run = make_run(tmp_path / "run", ref_models)
    with pytest.raises(FramelmError, match="smaller --tokens-per-batch"):
        run_stage("score", ScoreConfig(**SETTINGS), run)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="stride_tokens"):
        ScoreConfig.from_dict({"context_tokens": 16, "stride_tokens": 16})
    with pytest.raises(ConfigError, match="docs_per_shard"):
        ScoreConfig.from_dict({"docs_per_shard": 0})
    assert ScoreConfig(weak_model="/a", strong_model="/b").upstream() == ("tokenize",)


def test_bad_inputs_name_the_file_and_the_problem(ref_models, tmp_path):
    run = make_run(tmp_path / "run", ref_models)
    part = run.path("ingest", "documents", "part-00001.parquet")
    good = pq.read_table(part)
    pq.write_table(good.drop_columns(["n_bytes"]), part)
    with pytest.raises(FramelmError, match="part-00001.parquet: missing column.*n_bytes"):
        run_stage("score", ScoreConfig(**SETTINGS), run)
    pq.write_table(good, part)
    index = run.path("tokenize", "index.parquet")
    pq.write_table(pq.read_table(index).slice(1), index)  # drops doc-009, the last ingested
    with pytest.raises(FramelmError, match="'doc-009'.*re-run framelm tokenize"):
        run_stage("score", ScoreConfig(**SETTINGS), run)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_keeps_packed_windows_apart(scored, ref_models, attention):
    """The transformers backend's GPU packing (several windows per row, restarting positions,
    no attention mask) on the CPU: each window still sees only itself."""
    from framelm.scoring.scorer import DocumentScorer, ReferenceModel

    _, _, table = scored
    model = ReferenceModel("strong", ref_models["strong"], device=torch.device("cpu"), dtype=torch.float32,
                           attn_implementation=attention, max_window_tokens=CONTEXT, stride_tokens=STRIDE)
    model.row_tokens = model.window
    scorer = DocumentScorer([model], tokens_per_batch=96, logit_chunk_tokens=7)  # several logit chunks
    prepared = scorer.prepare(TEXTS)
    assert any(b.packed for b in prepared.per_model["strong"][1])
    nll, tokens = scorer.run(prepared)["strong"]
    assert tokens.tolist() == [n or 0 for n in table.column("strong_tokens").to_pylist()]
    expected = np.array([v or 0.0 for v in table.column("strong_nll").to_pylist()])
    np.testing.assert_allclose(nll, expected, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex attention runs unfused (eagerly) on the CPU
@pytest.mark.parametrize("rows", ["one window per row", "full rows, dense mask", "full rows, flex"])
def test_the_framelm_backend_gives_the_transformers_scores(scored, ref_models, rows):
    from framelm.scoring.scorer import DocumentScorer, ReferenceModel

    _, _, table = scored
    model = ReferenceModel("strong", ref_models["strong"], device=torch.device("cpu"), dtype=torch.float32,
                           max_window_tokens=CONTEXT, stride_tokens=STRIDE, backend="framelm")
    if rows != "one window per row":  # the packing the framelm backend uses on GPUs
        model.row_tokens, model.full_rows = model.window, True
        model.framelm.attention = "flex" if rows.endswith("flex") else "sdpa"
    scorer = DocumentScorer([model], tokens_per_batch=96, logit_chunk_tokens=7)
    prepared = scorer.prepare(TEXTS)
    assert any(b.packed for b in prepared.per_model["strong"][1]) == (rows != "one window per row")
    nll, tokens = scorer.run(prepared)["strong"]
    assert tokens.tolist() == [n or 0 for n in table.column("strong_tokens").to_pylist()]
    np.testing.assert_allclose(nll, [v or 0.0 for v in table.column("strong_nll").to_pylist()], rtol=1e-5)


def test_the_framelm_backend_refuses_what_it_cannot_run(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from framelm.scoring.scorer import ReferenceModel

    path = make_model(tmp_path / "biased", seed=0, vocab_size=300, bos="<s>", eos="</s>", layers=1)
    config = LlamaConfig.from_pretrained(path)
    config.attention_bias = True
    LlamaForCausalLM(config).save_pretrained(path)
    with pytest.raises(FramelmError, match="biased.*plain Llama models only.*attention_bias = True.*backend 'transformers'"):
        ReferenceModel("weak", path, device=torch.device("cpu"), dtype=torch.float32, backend="framelm")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_compiled_framelm_backend_gives_the_same_scores_at_every_batch_shape(scored, ref_models):
    """The GPU path on the CPU: compiled blocks, FlexAttention, full rows; two batch shapes."""
    from framelm.scoring.scorer import DocumentScorer, ReferenceModel

    _, _, table = scored
    model = ReferenceModel("strong", ref_models["strong"], device=torch.device("cpu"), dtype=torch.float32,
                           max_window_tokens=CONTEXT, stride_tokens=STRIDE, backend="framelm")
    model.row_tokens, model.full_rows, model.framelm.attention = model.window, True, "flex"
    model.framelm.compile_blocks()
    expected = np.array([v or 0.0 for v in table.column("strong_nll").to_pylist()])
    with torch.inference_mode():
        for tokens_per_batch in (96, 64):  # (3, 32) and (2, 32) batches
            scorer = DocumentScorer([model], tokens_per_batch=tokens_per_batch, logit_chunk_tokens=7)
            nll, _ = scorer.run(scorer.prepare(TEXTS))["strong"]
            np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_a_model_that_rescales_its_logits_is_refused(tmp_path):
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    from framelm.scoring.scorer import ReferenceModel

    from .conftest import _tokenizer

    path = tmp_path / "granite"
    _tokenizer(path, 300, "<s>", "</s>")
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(AutoTokenizer.from_pretrained(path)), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           logits_scaling=8.0)  # Granite divides its logits by this in forward
    GraniteForCausalLM(config).save_pretrained(path)
    with pytest.raises(FramelmError, match="granite.*GraniteForCausalLM.*transforms the output layer's logits"):
        ReferenceModel("strong", path, device=torch.device("cpu"), dtype=torch.float32)


def test_a_model_folder_replaced_in_place_is_scored_again(ref_models, tmp_path):
    models = {name: tmp_path / name for name in ref_models}
    for name, path in ref_models.items():
        shutil.copytree(path, models[name])
    run = make_run(tmp_path / "run", ref_models)
    cfg = ScoreConfig(weak_model=str(models["weak"]), strong_model=str(models["strong"]), **SETTINGS)
    run_stage("score", cfg, run)
    before = pq.read_table(run.path("score", "scores.parquet")).column("strong_nll").to_pylist()
    make_model(models["strong"], seed=7, vocab_size=400, bos=None, eos="<|endoftext|>")  # another checkpoint, same path
    run_stage("score", cfg, run)
    after = pq.read_table(run.path("score", "scores.parquet")).column("strong_nll").to_pylist()
    assert after != before
    # the same folders spelt another way are the same input: nothing to re-score
    other_spelling = ScoreConfig(weak_model=str(models["weak"]) + "/", strong_model=f"{models['strong'].parent}/./strong", **SETTINGS)
    assert stage_hash("score", other_spelling, run)[0] == stage_hash("score", cfg, run)[0]


def test_force_is_refused_for_the_ranks_of_a_distributed_run(ref_models, tmp_path):
    run = make_run(tmp_path / "run", ref_models)
    with pytest.raises(FramelmError, match=r"--force cannot be given to the 2 ranks.*delete .*score and launch"):
        run_stage("score", ScoreConfig(rank=1, world_size=2, **SETTINGS), run, force=True)


def test_shards_are_never_scored_in_two_precisions(ref_models, tmp_path, monkeypatch):
    from framelm.pipeline import stage_hash

    run = make_run(tmp_path / "run", ref_models)
    cfg = ScoreConfig(**SETTINGS)
    cpu_hash = stage_hash("score", cfg, run)[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_hash("score", cfg, run)[0] == cpu_hash, "dtype auto must not make the hash depend on the machine"
    monkeypatch.undo()
    run.path("score").mkdir()
    (run.path("score") / "precision.json").write_text('{"dtype": "bfloat16"}')  # as a GPU run left it
    from framelm.score import ShardScorer

    with pytest.raises(FramelmError, match=r"scored in bfloat16, but this process would score in float32 "
                                           r"\(dtype: auto on cpu\); set dtype: bfloat16 to resume"):
        ShardScorer(cfg, run)


def test_a_stray_parquet_file_beside_the_ingest_shards_is_not_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from framelm.ingest import IngestConfig
    from framelm.pipeline import run_stage
    from framelm.rundir import RunDir
    from framelm.score import DocumentTable

    data = tmp_path / "a.jsonl"
    data.write_text("".join(f'{{"id": "d{i}", "text": "document {i}"}}\n' for i in range(5)))
    run = RunDir(tmp_path / "run")
    run_stage("ingest", IngestConfig(inputs=[str(data)]), run)
    pq.write_table(pa.table({"note": ["mine"]}), run.path("ingest", "documents", "notes.parquet"))
    table = DocumentTable(run)
    assert table.n_docs == 5 and [f.name for f in table.files] == ["part-00000.parquet"]


def test_models_with_one_tokenizer_encode_each_shard_once(ref_models, monkeypatch):
    from framelm.scoring.scorer import DocumentScorer, ReferenceModel

    calls = []
    encode = ReferenceModel.encode
    monkeypatch.setattr(ReferenceModel, "encode", lambda self, texts: (calls.append(self.name), encode(self, texts))[1])
    load = dict(device=torch.device("cpu"), dtype=torch.float32, max_window_tokens=CONTEXT, stride_tokens=STRIDE)
    same = [ReferenceModel(n, ref_models["strong"], **load) for n in ("weak", "strong")]
    prepared = DocumentScorer(same, tokens_per_batch=96, logit_chunk_tokens=7).prepare(TEXTS)
    assert calls == ["weak"] and prepared.per_model["weak"][0].tolist() == prepared.per_model["strong"][0].tolist()
    calls.clear()
    other = [ReferenceModel("weak", ref_models["weak"], **load), same[1]]  # the fixture's two tokenizers differ
    DocumentScorer(other, tokens_per_batch=96, logit_chunk_tokens=7).prepare(TEXTS)
    assert calls == ["weak", "strong"]


def test_a_document_empty_under_one_model_keeps_the_other_models_numbers():
    import pyarrow as pa

    from framelm.score import shard_table

    docs = pa.table({"id": ["a", "b", "c"], "source": ["web"] * 3, "split": ["train"] * 3, "n_bytes": [10, 22, 5]})
    results = {"weak": (np.array([6.0, 0.0, 0.0]), np.array([3, 0, 0])),
               "strong": (np.array([3.0, 11.0, 0.0]), np.array([3, 4, 0]))}
    rows = shard_table(docs, results, "strong").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "empty_weak", "empty"]
    assert rows[1]["strong_tokens"] == 4 and rows[1]["ppl_strong"] == pytest.approx(np.exp(11 / 4))
    assert rows[1]["ppl"] == rows[1]["ppl_strong"]  # the PPL axis is the strong model's, which scored it
    assert rows[1]["weak_nll"] is None and rows[1]["pd"] is None
    assert rows[0]["pd"] == pytest.approx((np.exp(2) - np.exp(1)) / np.exp(2))
    assert all(v is None for k, v in rows[2].items() if k not in ("id", "source", "split", "n_bytes", "status"))


def test_the_tokenizer_warning_names_models_whose_tokens_differ(ref_models, tmp_path, caplog):
    from framelm.score import ShardScorer

    def warnings_for(weak: Path, strong: Path, name: str) -> list[str]:
        caplog.clear()
        run = make_run(tmp_path / name, {"weak": weak, "strong": strong})
        ShardScorer(ScoreConfig(weak_model=str(weak), strong_model=str(strong), context_tokens=CONTEXT, device="cpu"), run)
        return [r.getMessage() for r in caplog.records if "different tokenizers" in r.getMessage()]

    assert warnings_for(ref_models["strong"], ref_models["strong"], "same") == []
    assert len(warnings_for(ref_models["weak"], ref_models["strong"], "other")) == 1
