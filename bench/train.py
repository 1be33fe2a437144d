"""Training throughput: framelm's model + step vs Hugging Face LlamaForCausalLM of the same shape.

Both run the same training step in the same process (AdamW, fused on CUDA; bf16 autocast on
CUDA, fp32 on CPU; torch.compile when --compile: framelm as its trainer compiles, block by block
plus the loss; HF as a user would, the whole model) on the same random tokens, and the script
prints one JSON object with tokens/s, MFU (where the device's peak is known), the first step's
seconds (compilation included) and the ratio framelm / HF. Then, to show the data path is not
the bottleneck: the trainer itself (`framelm.train.fit`, which reads the token stream, copies
batches to the device and logs every step) on a stream of the same shape, and the batch
reader alone on the CPU. Last, framelm with document masking (packed documents, EOS every
--doc-tokens tokens; dense SDPA mask, and FlexAttention on GPUs), which HF's plain causal
step does not do. Each measurement is also printed to stderr as it finishes, so a run cut
short keeps what it measured.

    python -m bench.train                                 # GPU default: smollm-135m, 32 x 1024
    python -m bench.train --smoke                         # tiny CPU run (preset nano, 8 x 128)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from framelm.model import FrameLM, ModelConfig, count_params, flops_per_token, next_token_loss
from framelm.tokenstore import StageRange
from framelm.train import TrainConfig, fit
from framelm.train.data import BatchPlan
from framelm.hf_llama import llama_config
from framelm.train.loop import peak_flops


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm-135m")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first, at least 1 (compilation, allocator)")
    p.add_argument("--doc-tokens", type=int, default=512, help="document length for the doc-masking run")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile both (default: on CUDA)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings: preset nano, vocab 8192, 8 x 128, 5 steps")
    args = p.parse_args()
    if args.warmup_steps < 1:
        p.error("--warmup-steps must be at least 1: the first step is timed apart (compilation)")
    if args.smoke:
        args.preset, args.vocab, args.batch, args.seq_len, args.steps, args.warmup_steps = "nano", 8192, 8, 128, 5, 2
        args.doc_tokens = 64
    return args


def time_steps(step_fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first step, seconds per step after the warmup steps)."""
    started = time.perf_counter()
    step_fn()
    _sync(device)
    first = time.perf_counter() - started
    for _ in range(warmup - 1):
        step_fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(device)
    return first, (time.perf_counter() - start) / steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: torch.nn.Module, forward_loss, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def step():
        with autocast():
            loss = forward_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_models = args.compile if args.compile is not None else device.type == "cuda"
    margs = ModelConfig(preset=args.preset, max_seq_len=max(args.seq_len, 2048)).resolve(args.vocab)
    torch.manual_seed(0)
    tokens = torch.randint(1, args.vocab, (args.batch, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    packed = x.clone()
    packed[:, :: args.doc_tokens] = 0  # EOS (id 0) opens a document every doc_tokens tokens
    peak = peak_flops(device)
    flops = flops_per_token(margs, args.seq_len)
    tokens_per_step = args.batch * args.seq_len

    def rates(tps: float) -> dict:
        return {"tokens_per_s": round(tps, 1), "mfu": round(flops * tps / peak, 4) if peak else None}

    results: dict[str, dict] = {}
    started = time.perf_counter()

    def arm(name: str, measure) -> None:
        """Run one measurement; one that fails (an arm that never ran on this GPU) costs only its own row."""
        try:
            results[name] = measure()
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        results[name]["elapsed_s"] = round(time.perf_counter() - started, 1)  # against the script's time limit
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)

    def timed(step_fn) -> dict:
        first, seconds = time_steps(step_fn, args.steps, args.warmup_steps, device)
        return {"step_ms": round(seconds * 1000, 2), **rates(tokens_per_step / seconds), "first_step_s": round(first, 1)}

    ours = FrameLM(margs).to(device)
    loss_fn = next_token_loss
    if compile_models:  # as framelm.train.fit compiles
        ours.compile_blocks()
        loss_fn = torch.compile(next_token_loss)
    arm("framelm", lambda: timed(make_step(ours, lambda: loss_fn(ours(x), y), device)))

    def hf_llama() -> dict:
        """Built inside its arm, so that a failure to build it costs only this row; its weights
        and optimizer state leave the GPU when it returns."""
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(llama_config(margs, eos_id=0)).to(device)  # SDPA attention by default
        hf_run = torch.compile(hf) if compile_models else hf
        # HF's own loss path: labels shifted inside the model, as a user would call it.
        return timed(make_step(hf, lambda: hf_run(input_ids=x, labels=x).loss, device))

    arm("hf_llama", hf_llama)

    arm("framelm_fit", lambda: trainer_throughput(args, device, compile_models, rates))
    arm("batch_reader", lambda: batch_reader_throughput(args))

    arm("framelm_doc_masking", lambda: timed(make_step(ours, lambda: loss_fn(ours(packed, 0), y), device)))
    if device.type == "cuda":  # FlexAttention trains only on GPUs
        ours.attention = "flex"
        arm("framelm_doc_masking_flex", lambda: timed(make_step(ours, lambda: loss_fn(ours(packed, 0), y), device)))

    def ratio(a: str, b: str) -> float | None:
        rate_a, rate_b = results[a].get("tokens_per_s"), results[b].get("tokens_per_s")
        return round(rate_a / rate_b, 3) if rate_a and rate_b else None

    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "preset": args.preset, "params": count_params(margs), "vocab": args.vocab,
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "compile": compile_models,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        **results,
        "speedup_vs_hf": ratio("framelm", "hf_llama"),
        "fit_vs_step": ratio("framelm_fit", "framelm"),
    }))


def trainer_throughput(args: argparse.Namespace, device: torch.device, compile_models: bool, rates) -> dict:
    """framelm's own training loop on a random stream of warmup + timed steps, plain causal as in
    the "framelm" row: tokens over the mean of its logged step times after the warmup steps,
    as the bare step is timed."""
    n_steps = args.warmup_steps + args.steps
    tokens = np.random.default_rng(0).integers(1, args.vocab, n_steps * args.batch * args.seq_len + 1).astype(np.uint16)
    cfg = TrainConfig(model=ModelConfig(preset=args.preset, max_seq_len=max(args.seq_len, 2048)), seq_len=args.seq_len,
                      global_batch_seqs=args.batch, lr=1e-4, lr_schedule="constant", warmup_fraction=0.0,
                      eval_every_steps=0, checkpoint_every_steps=n_steps, doc_masking=False, compile=compile_models,
                      device=device.type)
    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, tokens, [StageRange("all", 0, len(tokens))], Path(tmp), eos_id=0, vocab_size=args.vocab)
        log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    seconds = [args.batch * args.seq_len / r["tokens_per_s"] for r in log if r["type"] == "train" and r["step"] > args.warmup_steps]
    return {"steps": len(seconds), **rates(args.batch * args.seq_len / statistics.mean(seconds))}


def batch_reader_throughput(args: argparse.Namespace) -> dict:
    """tokens/s of the trainer's batch reader alone (BatchPlan.rows on a memory-mapped stream)."""
    steps = 200
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(1, args.vocab, steps * args.batch * args.seq_len + 1).astype(np.uint16).tofile(path)
        stream = np.memmap(path, dtype=np.uint16, mode="r")
        plan = BatchPlan(stream, [StageRange("all", 0, len(stream))], args.seq_len, args.batch)
        start = time.perf_counter()
        for step in range(steps):
            plan.rows(step, 0, args.batch)
        seconds = time.perf_counter() - start
    return {"steps": steps, "tokens_per_s": round(steps * args.batch * args.seq_len / seconds, 1)}


if __name__ == "__main__":
    main()
