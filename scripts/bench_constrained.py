#!/usr/bin/env python3
"""The cost of a JSON-schema constraint on decoding (issue 13), measured
through `taper serve`: 1 stream and 16 concurrent streams, free and
constrained runs interleaved, each reported as wall-clock tokens/s and as
the server's CPU time per generated token (from /proc/PID/stat), which a
busy shared machine disturbs far less than wall time.

    python3 scripts/bench_constrained.py --taper target/release/taper \
        --model /path/to/qwen2.5-0.5b --quant q4_k [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "email": {"type": "string"},
        "city": {"type": "string"},
        "bio": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "email", "city", "bio", "hobbies"],
}


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def post(port, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def run(port, pid, streams, max_tokens, constrained):
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "ignore_eos": True,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        }
    tokens = [0] * streams

    def one(i):
        b = dict(body, seed=i)
        tokens[i] = post(port, b)["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    n = sum(tokens)
    return n / wall, cpu * 1e3 / n, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--taper", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="q4_k")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=18734)
    a = ap.parse_args()
    server = subprocess.Popen(
        [a.taper, "serve", "--model", a.model, "--quant", a.quant,
         "--served-model-name", "m", "--port", str(a.port), "--max-batch", "16"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.5)
        run(a.port, server.pid, 1, 8, False)  # warm-up
        for streams, max_tokens in [(1, 128), (16, 64)]:
            rows = {False: [], True: []}
            for _ in range(a.rounds):
                for constrained in (False, True):
                    rows[constrained].append(run(a.port, server.pid, streams, max_tokens, constrained))
            for constrained in (False, True):
                r = rows[constrained]
                print(
                    f"{streams:2d} stream(s) {'constrained' if constrained else 'free       '}: "
                    f"t/s {', '.join(f'{x[0]:.1f}' for x in r)} (median {statistics.median(x[0] for x in r):.1f}); "
                    f"CPU ms/token {', '.join(f'{x[1]:.2f}' for x in r)} (median {statistics.median(x[1] for x in r):.2f}); "
                    f"tokens {[x[2] for x in r]}",
                    flush=True,
                )
            free = statistics.median(x[1] for x in rows[False])
            cons = statistics.median(x[1] for x in rows[True])
            print(f"{streams:2d} stream(s): constrained CPU per token = {cons / free:.3f}x free", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
