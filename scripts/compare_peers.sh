#!/usr/bin/env bash
# Measures taper, llama.cpp and transformers side by side, in one run, on the
# same random-weight model in a real model's shape, at the same thread count,
# and prints one Markdown table (paste it into BENCHMARKS.md with the date).
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
# Every run goes through /usr/bin/time for its peak RSS; each writes JSON
# lines {"runner", "quant", "row"} and one {"runner", "quant", "rss_kb"}.
cargo build --release --locked >/dev/null 2>&1
out="$work/results-$shape.jsonl"
: > "$out"
rss() { # rss RUNNER QUANT: appends the peak RSS of the last measured run
  echo "{\"runner\":\"$1\",\"quant\":\"$2\",\"rss_kb\":$(cat "$work/rss.tmp")}" >> "$out"
}
timed() { /usr/bin/time -f %M -o "$work/rss.tmp" "$@"; }
taper=./target/release/taper
# Bandwidth once, for the record (taper's own streaming read, same threads).
$taper bench --model "$model" -p 0 -n 1 -r 1 -t "$threads" 2>&1 | grep -m1 "memory read bandwidth" || true
for q in bf16 Q8_0 Q4_K_M; do
  timed "$bench" -m "$gguf-$q.gguf" -p 512 -n 128 -t "$threads" -r 3 -o jsonl \
    | sed "s/^/{\"runner\":\"llama.cpp\",\"quant\":\"$q\",\"row\":/; s/\$/}/" >> "$out"
  rss llama.cpp "$q"
done
taper_run() { # taper_run LABEL FLAGS...
  local label=$1; shift
  # A failing configuration is reported and skipped, not fatal to the table.
  if timed $taper bench "$@" -p 512 -n 128 -r 3 -t "$threads" -o json --bandwidth-mib 0 \
       2>"$work/taper-err.log" > "$work/taper.json"; then
    "$py" -c 'import json,sys; [print(json.dumps({"runner":"taper","quant":sys.argv[1],"row":r})) for r in json.load(open(sys.argv[2]))]' \
      "$label" "$work/taper.json" >> "$out"
    rss taper "$label"
  else
    echo "taper $label failed: $(tail -n1 "$work/taper-err.log")" >&2
  fi
}
taper_run f32 --model "$model" --dtype f32
taper_run bf16 --model "$model" --dtype bf16
taper_run q8_0 --model "$model" --quant q8_0
taper_run q4_k --model "$model" --quant q4_k
# llama.cpp's own files, loaded as they are.
taper_run "Q8_0 gguf" --model "$gguf-Q8_0.gguf"
taper_run "Q4_K_M gguf" --model "$gguf-Q4_K_M.gguf"
for dt in float32 bfloat16; do
  OMP_NUM_THREADS="$threads" timed "$py" scripts/bench_transformers.py --model "$model" --dtype "$dt" \
    --threads "$threads" -p 512 -n 128 -r 3 >> "$out"
  rss transformers "$dt"
done

"$py" - "$out" "$shape" "$threads" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def ts(r):
    row = r["row"]
    if r["runner"] == "llama.cpp":
        test = "pp" if row["n_gen"] == 0 else "tg"
        return test, row["avg_ts"], row["stddev_ts"]
    if r["runner"] == "taper":
        return row["test"][:2], row["mean_ts"], row["stddev_ts"]
    return row["test"], row["mean_ts"], row["stddev_ts"]
print(f"| runner | weights | pp512 t/s | tg128 t/s | peak RSS |  ({sys.argv[2]}, {sys.argv[3]} threads)")
print("| --- | --- | ---: | ---: | ---: |")
table = {}
for r in rows:
    cell = table.setdefault((r["runner"], r["quant"]), {})
    if "rss_kb" in r:
        cell["rss"] = f"{r['rss_kb'] / 1024:,.0f} MiB"
        continue
    test, mean, sd = ts(r)
    cell[test] = f"{mean:.1f} ± {sd:.1f}"
for (runner, quant), v in table.items():
    print(f"| {runner} | {quant} | {v.get('pp', '-')} | {v.get('tg', '-')} | {v.get('rss', '-')} |")
EOF
