"""Prompt-processing and decode speed of `transformers` on torch CPU, for
scripts/compare_peers.sh: the same method as `taper bench` (a warm-up, then
repetitions; random prompt ids; decode feeds one token a step with the KV
cache; no sampling). Prints one JSON line per test.

    python scripts/bench_transformers.py --model DIR --dtype float32 -p 512 -n 128 -r 3 --threads 2
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def pp():
        ids = torch.randint(0, vocab, (1, args.p), generator=gen)
        t = time.perf_counter()
        model(ids, use_cache=True)
        return args.p / (time.perf_counter() - t)

    def tg():
        out = model(torch.randint(0, vocab, (1, 1), generator=gen), use_cache=True)
        cache = out.past_key_values
        t = time.perf_counter()
        for _ in range(args.n):
            ids = torch.randint(0, vocab, (1, 1), generator=gen)
            cache = model(ids, past_key_values=cache, use_cache=True).past_key_values
        return args.n / (time.perf_counter() - t)

    with torch.inference_mode():
        for name, fn in (("pp", pp), ("tg", tg)):
            fn()  # warm-up
            samples = [fn() for _ in range(args.r)]
            row = {"test": name, "mean_ts": statistics.mean(samples),
                   "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                   "samples_ts": samples}
            print(json.dumps({"runner": "transformers", "quant": args.dtype, "row": row}), flush=True)


if __name__ == "__main__":
    main()
