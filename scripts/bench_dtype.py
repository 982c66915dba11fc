"""bf16 against fp32 on this CPU: the measurement behind ``model.dtype: auto`` (paser.hardware.auto_dtype).

    taskset -c 0 python scripts/bench_dtype.py [--repeats 5]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE taskset -c 0 python scripts/bench_dtype.py   # as a CPU without bf16 units

A forward pass of a randomly initialised decoder of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536,
9 query heads on 3 KV heads, 49,152-token vocabulary) over 8 x 128 tokens, one thread, inference mode, in
each dtype; the best of ``--repeats`` interleaved passes after a warm-up. ONEDNN_MAX_CPU_ISA caps the
instructions oneDNN, which runs torch's bf16 matmuls on x86, may use: AVX512_CORE leaves out AVX512-BF16
and AMX, as on an AVX-512 CPU without bf16 hardware. Prints the host, tokens/s per dtype and their ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from paser.hardware import cpu_bf16_units, cpu_model


def decoder(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"host: {cpu_model()}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"bf16 units: {', '.join(cpu_bf16_units()) or 'none'}; "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
    ids = torch.randint(0, 49152, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    models = {name: decoder(dtype) for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for model in models.values():
            model(ids)  # warm-up: kernels chosen, buffers allocated
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(ids)
                best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:>9}: {ids.numel() / seconds:7.0f} tok/s (best of {args.repeats}: {seconds:.2f} s)")
    print(f"bf16/fp32 throughput ratio: {best['float32'] / best['bfloat16']:.2f}")


if __name__ == "__main__":
    main()
