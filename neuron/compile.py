#!/usr/bin/env python3
"""Compiles a Hugging Face Llama-family model for inferd's Neuron backend
with NxD Inference, ahead of time, with buckets that match the server's
flags. Run it on any EC2 host inside the pinned Neuron image (README.md);
compiling takes minutes to tens of minutes, so never at boot.

    python3 neuron/compile.py --model /models/Llama-3.2-1B-Instruct \\
        --output /opt/inferd/compiled/llama-3.2-1b --tp-degree 2 \\
        --max-num-seqs 8 --max-num-batched-tokens 2048 --max-model-len 4096

Serve the result with the same flags:

    inferd serve --device neuron --model /models/Llama-3.2-1B-Instruct \\
        --neuron-model-dir /opt/inferd/compiled/llama-3.2-1b \\
        --max-num-seqs 8 --max-num-batched-tokens 2048 --max-model-len 4096

What it compiles (NxDI NeuronConfig): the block KV layout with prefix
caching (inferd's block pool decides which block holds what), continuous
batching, context-encoding buckets of powers of two from 128 up to
--max-num-batched-tokens (the longest prompt a step prefills whole),
token generation at batch --max-num-seqs, and on-device sampling with
per-request temperature, top-k (up to --global-top-k) and top-p. Next to
NxDI's artifacts it writes inferd-compiled.json, which the worker and
inferd read. `--dry-run` writes only that file and prints the NeuronConfig
it would compile with (this runs anywhere: make test checks it).

NOT YET RUN ON INFERENTIA OR WITH THE NEURON SDK: written against NxDI
0.10's documented API.
"""
import argparse
import json
import os
import sys

COMPILED_FILE = "inferd-compiled.json"


def powers_of_two(lo, hi):
    """128, 256, ... up to hi, and hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return out


def plan(args, vocab_size, model_name):
    """The NeuronConfig keyword arguments and the inferd manifest for args."""
    prompt_buckets = powers_of_two(min(128, args.max_num_batched_tokens), args.max_num_batched_tokens)
    blocks_per_seq = -(-args.max_model_len // args.block_size)
    num_blocks = args.num_blocks or args.max_num_seqs * blocks_per_seq
    neuron_config = {
        "tp_degree": args.tp_degree,
        "batch_size": args.max_num_seqs,
        "ctx_batch_size": 1,
        "tkg_batch_size": args.max_num_seqs,
        "max_batch_size": args.max_num_seqs,
        "is_continuous_batching": True,
        "seq_len": args.max_model_len,
        "max_context_length": args.max_num_batched_tokens,
        "enable_bucketing": True,
        "context_encoding_buckets": prompt_buckets,
        "token_generation_buckets": powers_of_two(min(128, args.max_model_len), args.max_model_len),
        "is_block_kv_layout": True,
        "pa_num_blocks": num_blocks,
        "pa_block_size": args.block_size,
        "is_prefix_caching": True,
        "torch_dtype": args.dtype,
        "on_device_sampling_config": {"dynamic": True, "do_sample": True, "global_topk": args.global_top_k},
    }
    compiled = {
        "model": model_name,
        "kv_layout": "paged",
        "block_size": args.block_size,
        "num_blocks": num_blocks,
        "max_model_len": args.max_model_len,
        "vocab_size": vocab_size,
        "dtype": {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[args.dtype],
        # Context encoding runs one prompt per call; inferd packs several
        # prompts into one step and the worker runs them in turn, so a
        # step holds up to --max-num-seqs sequences either way.
        "batch_sizes": [args.max_num_seqs],
        "token_counts": prompt_buckets,
        "max_top_k": args.global_top_k,
        "tp_degree": args.tp_degree,
    }
    return neuron_config, compiled


def compile_model(args, neuron_kwargs):
    import torch  # noqa: F401  (from the Neuron image)
    from neuronx_distributed_inference.models.config import NeuronConfig, OnDeviceSamplingConfig
    from neuronx_distributed_inference.models.llama.modeling_llama import (
        LlamaInferenceConfig,
        NeuronLlamaForCausalLM,
    )
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    kwargs = dict(neuron_kwargs)
    kwargs["on_device_sampling_config"] = OnDeviceSamplingConfig(**kwargs["on_device_sampling_config"])
    neuron_config = NeuronConfig(**kwargs)
    config = LlamaInferenceConfig(neuron_config, load_config=load_pretrained_config(args.model))
    model = NeuronLlamaForCausalLM(args.model, config)
    model.compile(args.output)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors)")
    ap.add_argument("--output", required=True, help="folder for the compiled artifacts")
    ap.add_argument("--tp-degree", type=int, default=2, help="NeuronCores per model (inf2: 1, 2, 4, 8 or 24)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="longest prompt prefilled in one step")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=32, help="NxDI's pa_block_size (32 recommended)")
    ap.add_argument("--num-blocks", type=int, default=0, help="KV blocks (default: every sequence at full length)")
    ap.add_argument("--global-top-k", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dry-run", action="store_true", help="write inferd-compiled.json only; print the NeuronConfig")
    args = ap.parse_args(argv)
    for name in ("tp_degree", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "global_top_k"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_num_batched_tokens > args.max_model_len:
        ap.error("--max-num-batched-tokens cannot exceed --max-model-len")
    with open(os.path.join(args.model, "config.json")) as f:
        hf = json.load(f)
    neuron_kwargs, compiled = plan(args, hf["vocab_size"], os.path.basename(os.path.normpath(args.model)))
    os.makedirs(args.output, exist_ok=True)
    if args.dry_run:
        json.dump(neuron_kwargs, sys.stdout, indent=2)
        print()
    else:
        compile_model(args, neuron_kwargs)
    with open(os.path.join(args.output, COMPILED_FILE), "w") as f:
        json.dump(compiled, f, indent=2)
    print(f"wrote {os.path.join(args.output, COMPILED_FILE)}", file=sys.stderr)


if __name__ == "__main__":
    main()
