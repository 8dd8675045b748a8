#!/usr/bin/env bash
# Measures taper, llama.cpp and transformers side by side, in one run, on the
# same random-weight model in a real model's shape, at the same thread count,
# and prints one Markdown table (paste it into BENCHMARKS.md with the date).
# ROUNDS=N (default 3) sets how many times each llama.cpp / taper pair runs.
#
#   scripts/compare_peers.sh [SHAPE] [THREADS]      # SHAPE: qwen2.5-0.5b (default) or llama3.2-1b
#
# llama.cpp comes from PyPI's llama-cpp-python sdist (which vendors its whole
# source, with llama-bench, llama-quantize and convert_hf_to_gguf.py) and is
# built with CMake for this CPU; transformers runs on torch CPU. Everything
# lands under target/peers (nothing is committed). Needs python3 with venv,
# cmake-able C++ toolchain, and the tokenizers from scripts/fetch_tokenizers.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
shape="${1:-qwen2.5-0.5b}"
threads="${2:-2}"
work="$PWD/target/peers"
mkdir -p "$work"
py="$work/venv/bin/python"

# --- tools -------------------------------------------------------------------
if [ ! -x "$py" ]; then
  python3 -m venv "$work/venv"
  "$py" -m pip install -q --disable-pip-version-check -r scripts/requirements-fixtures.txt
  "$py" -m pip install -q --disable-pip-version-check cmake ninja scikit-build-core sentencepiece
fi
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n1 || true)
if [ -z "$src" ]; then
  (cd "$work" && "$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python -d . \
     && tar xzf llama_cpp_python-*.tar.gz)
  src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp | head -n1)
  "$py" -m pip install -q "$src/gguf-py"
fi
bench="$src/build/bin/llama-bench"
if [ ! -x "$bench" ]; then
  PATH="$work/venv/bin:$PATH" cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  PATH="$work/venv/bin:$PATH" cmake --build "$src/build" --target llama-bench llama-quantize -j "$(nproc)" >/dev/null
fi

# --- the model ---------------------------------------------------------------
bash scripts/fetch_tokenizers.sh target/test-tokenizers >/dev/null
tok=target/test-tokenizers/qwen3
[ "$shape" = llama3.2-1b ] && tok=target/test-tokenizers/llama3_1
model="target/bench-models/$shape"
[ -f "$model/model.safetensors" ] || "$py" scripts/make_bench_model.py --shape "$shape" --tokenizer "$tok" --out "$model"
gguf="$work/$shape"
[ -f "$gguf-bf16.gguf" ] || "$py" "$src/convert_hf_to_gguf.py" "$model" --outtype bf16 --outfile "$gguf-bf16.gguf" >/dev/null 2>&1
for q in Q8_0 Q4_K_M; do
  [ -f "$gguf-$q.gguf" ] || "$src/build/bin/llama-quantize" "$gguf-bf16.gguf" "$gguf-$q.gguf" "$q" >/dev/null 2>&1
done

# --- measurements --------------------------------------------------------------
# The machine is shared and noisy, so each configuration runs once per round
# (ROUNDS, default 3), right after its llama.cpp counterpart; the table gives
# per-configuration medians over the rounds and the median of the per-round
# ratios taper / llama.cpp. Every run goes through /usr/bin/time for its peak
# RSS; each writes JSON lines {"runner", "quant", "round", "row"} and one
# {"runner", "quant", "round", "rss_kb"}.
rounds="${ROUNDS:-3}"
cargo build --release --locked >/dev/null 2>&1
out="$work/results-$shape.jsonl"
: > "$out"
rss() { # rss RUNNER QUANT ROUND: appends the peak RSS of the last measured run
  echo "{\"runner\":\"$1\",\"quant\":\"$2\",\"round\":$3,\"rss_kb\":$(cat "$work/rss.tmp")}" >> "$out"
}
timed() { /usr/bin/time -f %M -o "$work/rss.tmp" "$@"; }
taper=./target/release/taper
# Bandwidth once, for the record (taper's own streaming read, same threads).
$taper bench --model "$model" -p 0 -n 1 -r 1 -t "$threads" 2>&1 | grep -m1 "memory read bandwidth" || true
llama_run() { # llama_run QUANT ROUND REPS
  timed "$bench" -m "$gguf-$1.gguf" -p 512 -n 128 -t "$threads" -r "$3" -o jsonl \
    | sed "s/^/{\"runner\":\"llama.cpp\",\"quant\":\"$1\",\"round\":$2,\"row\":/; s/\$/}/" >> "$out"
  rss llama.cpp "$1" "$2"
}
taper_run() { # taper_run LABEL ROUND REPS FLAGS...
  local label=$1 round=$2 reps=$3; shift 3
  # A failing configuration is reported and skipped, not fatal to the table.
  if timed $taper bench "$@" -p 512 -n 128 -r "$reps" -t "$threads" -o json --bandwidth-mib 0 \
       2>"$work/taper-err.log" > "$work/taper.json"; then
    "$py" -c 'import json,sys; [print(json.dumps({"runner":"taper","quant":sys.argv[1],"round":int(sys.argv[3]),"row":r})) for r in json.load(open(sys.argv[2]))]' \
      "$label" "$work/taper.json" "$round" >> "$out"
    rss taper "$label" "$round"
  else
    echo "taper $label failed: $(tail -n1 "$work/taper-err.log")" >&2
  fi
}
for round in $(seq 1 "$rounds"); do
  echo "round $round of $rounds" >&2
  llama_run bf16 "$round" 1
  taper_run bf16 "$round" 1 --model "$model" --dtype bf16
  llama_run Q8_0 "$round" 1
  taper_run q8_0 "$round" 1 --model "$model" --quant q8_0
  taper_run "Q8_0 gguf" "$round" 1 --model "$gguf-Q8_0.gguf"
  llama_run Q4_K_M "$round" 1
  taper_run q4_k "$round" 1 --model "$model" --quant q4_k
  taper_run "Q4_K_M gguf" "$round" 1 --model "$gguf-Q4_K_M.gguf"
done
# f32 against transformers: slower, so once each, three repetitions.
taper_run f32 1 3 --model "$model" --dtype f32
for dt in float32 bfloat16; do
  OMP_NUM_THREADS="$threads" timed "$py" scripts/bench_transformers.py --model "$model" --dtype "$dt" \
    --threads "$threads" -p 512 -n 128 -r 3 >> "$out"
  rss transformers "$dt" 1
done

"$py" - "$out" "$shape" "$threads" "$rounds" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def ts(r):
    row = r["row"]
    if r["runner"] == "llama.cpp":
        return ("pp" if row["n_gen"] == 0 else "tg"), row["avg_ts"]
    if r["runner"] == "taper":
        return row["test"][:2], row["mean_ts"]
    return row["test"], row["mean_ts"]
# (runner, quant) -> test -> round -> t/s, and (runner, quant) -> [MiB]
speed, rss = {}, {}
for r in rows:
    key = (r["runner"], r["quant"])
    if "rss_kb" in r:
        rss.setdefault(key, []).append(r["rss_kb"] / 1024)
        continue
    test, v = ts(r)
    speed.setdefault(key, {}).setdefault(test, {})[r.get("round", 1)] = v
peer = {"bf16": ("llama.cpp", "bf16"), "q8_0": ("llama.cpp", "Q8_0"), "Q8_0 gguf": ("llama.cpp", "Q8_0"),
        "q4_k": ("llama.cpp", "Q4_K_M"), "Q4_K_M gguf": ("llama.cpp", "Q4_K_M"),
        "f32": ("transformers", "float32")}
def cell(key, test):
    s = speed.get(key, {}).get(test, {})
    if not s:
        return "-"
    v = f"{statistics.median(s.values()):.1f}"
    p = peer.get(key[1]) if key[0] == "taper" else None
    base = speed.get(p, {}).get(test, {}) if p else {}
    ratios = [s[k] / base[k] for k in s if k in base]
    if ratios:
        v += f" ({statistics.median(ratios):.2f}×)"
    return v
print(f"| runner | weights | pp512 t/s | tg128 t/s | peak RSS |  ({sys.argv[2]}, {sys.argv[3]} threads, "
      f"median of {sys.argv[4]} rounds; (×): taper / llama.cpp in the same format, or f32 / transformers f32, median of the per-round ratios)")
print("| --- | --- | ---: | ---: | ---: |")
for key in dict.fromkeys(list(speed) + list(rss)):
    m = f"{statistics.median(rss[key]):,.0f} MiB" if key in rss else "-"
    print(f"| {key[0]} | {key[1]} | {cell(key, 'pp')} | {cell(key, 'tg')} | {m} |")
EOF
