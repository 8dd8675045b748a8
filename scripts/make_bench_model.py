"""Write a random-weight model in the exact shape of a real one, for benchmarks.

Random weights cost exactly what real weights cost to load and to run, and
the Hub is not needed. The tokenizer files are copied from a folder given with
--tokenizer (e.g. one unpacked by scripts/fetch_tokenizers.sh), so `taper
generate` and `taper chat` run on the result.

    /path/to/python scripts/make_bench_model.py --shape qwen2.5-0.5b \
        --tokenizer target/test-tokenizers/qwen3 --out target/bench-models/qwen2.5-0.5b
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    # Qwen/Qwen2.5-0.5B-Instruct's config.json
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    ),
    # meta-llama/Llama-3.2-1B-Instruct's config.json
    "llama3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = ap.parse_args()

    spec = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    if args.tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(args.tokenizer / name, args.out / name)
    (args.out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": spec["eos_token_id"], "do_sample": False}, indent=2))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
