#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test files (models/ggml-vocab-*.gguf with
# their .inp/.out reference ids) for tests/gguf.rs, from the llama.cpp tree
# that PyPI's llama-cpp-python sdist vendors (pinned by hash), into
# DEST/models. Once: a later call with the files present does nothing.
#
#   scripts/fetch_llama_cpp_vocab.sh DEST
set -euo pipefail
dest="$1"
names=(qwen2 llama-bpe gpt-2 starcoder llama-spm phi-3)
[ -f "$dest/models/ggml-vocab-${names[-1]}.gguf.out" ] && exit 0
version=0.3.36
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$version.tar.gz"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$url" "$sha" "$tmp/sdist.tar.gz" <<'PY'
import hashlib, sys, urllib.request
url, sha, out = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=300).read()
got = hashlib.sha256(data).hexdigest()
if got != sha:
    sys.exit(f"{url}: sha256 {got}, expected {sha}")
open(out, "wb").write(data)
PY
files=()
for n in "${names[@]}"; do
  for ext in "" .inp .out; do
    files+=("llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-$n.gguf$ext")
  done
done
tar xzf "$tmp/sdist.tar.gz" -C "$tmp" "${files[@]}"
mkdir -p "$dest/models"
cp "$tmp/llama_cpp_python-$version/vendor/llama.cpp/models/"ggml-vocab-* "$dest/models/"
