"""Training throughput: framelm's model + step vs Hugging Face LlamaForCausalLM of the same shape.

Both run the same training step in the same process (AdamW, fused on CUDA; bf16 autocast on
CUDA, fp32 on CPU; torch.compile when --compile) on the same random tokens, and the script
prints one JSON object with tokens/s, MFU (where the device's peak is known) and the ratio
framelm / HF. framelm is also timed with document masking on (packed documents, EOS every
--doc-tokens tokens; dense SDPA mask, and FlexAttention on GPUs), which HF's plain causal
step does not do.

    python bench/train.py                                 # GPU default: smollm-135m, 32 x 1024
    python bench/train.py --smoke                         # tiny CPU run (preset nano, 8 x 128)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch

from framelm.model import FrameLM, ModelConfig, count_params, flops_per_token, next_token_loss
from framelm.train.hf_export import llama_config
from framelm.train.loop import GPU_PEAK_FLOPS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm-135m")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--doc-tokens", type=int, default=512, help="document length for the doc-masking run")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile both (default: on CUDA)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings: preset nano, vocab 8192, 8 x 128, 5 steps")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.vocab, args.batch, args.seq_len, args.steps, args.warmup_steps = "nano", 8192, 8, 128, 5, 2
        args.doc_tokens = 64
    return args


def time_steps(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, after warmup steps."""
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


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
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) if device.type == "cuda" else None
    flops = flops_per_token(margs, args.seq_len)
    tokens_per_step = args.batch * args.seq_len

    def measure(step_fn) -> dict:
        seconds = time_steps(step_fn, args.steps, args.warmup_steps, device)
        tps = tokens_per_step / seconds
        return {"step_ms": round(seconds * 1000, 2), "tokens_per_s": round(tps, 1),
                "mfu": round(flops * tps / peak, 4) if peak else None}

    results = {}
    ours = FrameLM(margs).to(device)
    ours_run = torch.compile(ours) if compile_models else ours
    results["framelm"] = measure(make_step(ours, lambda: next_token_loss(ours_run(x), y), device))
    results["framelm_doc_masking"] = measure(make_step(ours, lambda: next_token_loss(ours_run(packed, 0), y), device))
    if device.type == "cuda":  # FlexAttention is compiled only on GPUs; eager on the CPU it is slow by design
        ours.attention = "flex"
        results["framelm_doc_masking_flex"] = measure(make_step(ours, lambda: next_token_loss(ours_run(packed, 0), y), device))
    del ours, ours_run

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(margs, eos_id=0)).to(device)  # SDPA attention by default
    hf_run = torch.compile(hf) if compile_models else hf
    # HF's own loss path: labels shifted inside the model, as a user would call it.
    results["hf_llama"] = measure(make_step(hf, lambda: hf_run(input_ids=x, labels=x).loss, device))

    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "preset": args.preset, "params": count_params(margs), "vocab": args.vocab,
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "compile": compile_models,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        **results,
        "speedup_vs_hf": round(results["framelm"]["tokens_per_s"] / results["hf_llama"]["tokens_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
