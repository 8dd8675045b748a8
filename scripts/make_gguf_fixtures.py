"""Make the GGUF fixtures under tests/fixtures/gguf/ from the tiny models in
tests/fixtures/models/, with llama.cpp's own converter.

What it makes, for the tests in tests/gguf.rs:

    {qwen2,llama,gemma2}-f32.gguf    exact parity with the transformers references
    {qwen2,llama,llama3,qwen3,phi3,gemma3}-q8_0.gguf
                                     top-1 agreement; llama.cpp's Q8_0 blocks
    mixtral-{f32,q8_0}.gguf          mixture of experts: llama.cpp's merged
                                     3-D expert tensors (its converter cannot
                                     write the qwen3_moe fixture, whose dense
                                     `mlp_only_layers` llama.cpp lacks)

Each GGUF is what `convert_hf_to_gguf.py --outtype f32|q8_0` writes for the
fixture's folder: Q and K rows permuted for `llama`, Gemma's norms stored as
1 + w, the tokenizer as `tokenizer.ggml.*` metadata, llama 3's rope scaling as
a `rope_freqs.weight` tensor. The fixtures carry no tokenizer.model and a
tokenizer that llama.cpp's hash table does not know, so this script adapts the
converter from outside (the converter itself is untouched):

- `get_vocab_base_pre` answers "gpt-2": the fixture tokenizer is byte-level BPE
  with GPT-2's pre-tokenizer regex (`pre_tokenizers.ByteLevel(use_regex=True)`),
  which is exactly llama.cpp's "gpt-2" pre-tokenizer.
- Gemma 2/3 and Phi-3 read the vocabulary with `_set_vocab_gpt2` instead of
  SentencePiece, since the fixtures share one BPE tokenizer.
- Gemma: the converter does not write `query_pre_attn_scalar` (llama.cpp
  derives the attention scale from the head size), and writes no sliding-window
  pattern for Gemma 3 (llama.cpp defaults to 5 sliding layers in 6). The
  fixtures use a scalar of 24 and a pattern of 3, so the script adds the keys
  llama.cpp reads for both, `{arch}.attention.scale` and
  `{arch}.attention.sliding_window_pattern` (one bool per layer).

Run it by hand when the fixtures or the converter change:

    /work/pyenv/bin/python scripts/make_gguf_fixtures.py [LLAMA_CPP_DIR [NAME-OUTTYPE ...]]

LLAMA_CPP_DIR defaults to the llama.cpp tree `scripts/compare_peers.sh` unpacks
under target/peers/. It needs torch, transformers and llama.cpp's gguf-py
(scripts/requirements-fixtures.txt, plus `pip install LLAMA_CPP_DIR/gguf-py`).
"""

from __future__ import annotations

import glob
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
OUT_DIR = ROOT / "tests" / "fixtures" / "gguf"

# (fixture, outtype)
OUTPUTS = [
    ("qwen2", "f32"),
    ("llama", "f32"),
    ("gemma2", "f32"),
    ("qwen2", "q8_0"),
    ("llama", "q8_0"),
    ("llama3", "q8_0"),
    ("qwen3", "q8_0"),
    ("phi3", "q8_0"),
    ("gemma3", "q8_0"),
    ("mixtral", "f32"),
    ("mixtral", "q8_0"),
]


def llama_cpp_dir() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    found = sorted(glob.glob(str(ROOT / "target/peers/llama_cpp_python-*/vendor/llama.cpp")))
    if not found:
        sys.exit("no llama.cpp tree under target/peers: run scripts/compare_peers.sh or pass LLAMA_CPP_DIR")
    return Path(found[-1])


def load_converter(src: Path):
    """Imports convert_hf_to_gguf.py as a module (its main() is not run)."""
    sys.path.insert(0, str(src))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", src / "convert_hf_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adapt(conversion) -> None:
    """The changes described in the module docstring, made from outside."""
    from conversion.base import TextModel
    from conversion.gemma import Gemma2Model, Gemma3Model
    from conversion.phi import Phi3MiniModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    for cls in (Gemma2Model, Gemma3Model, Phi3MiniModel):
        cls.set_vocab = TextModel._set_vocab_gpt2

    def gemma_parameters(original):
        def set_gguf_parameters(self):
            original(self)
            h = self.hparams
            scalar = h.get("query_pre_attn_scalar")
            if scalar is not None and scalar != h["head_dim"]:
                self.gguf_writer.add_attention_scale(scalar ** -0.5)
            if (types := h.get("layer_types")) is not None:
                self.gguf_writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        return set_gguf_parameters

    for cls in (Gemma2Model, Gemma3Model):
        cls.set_gguf_parameters = gemma_parameters(cls.set_gguf_parameters)


def main() -> None:
    src = llama_cpp_dir()
    converter = load_converter(src)
    import conversion

    adapt(conversion)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[2:])  # e.g. mixtral-f32: remake only those
    for name, outtype in OUTPUTS:
        if only and f"{name}-{outtype}" not in only:
            continue
        out = OUT_DIR / f"{name}-{outtype}.gguf"
        sys.argv = [
            "convert_hf_to_gguf.py",
            str(MODELS / name),
            "--outtype", outtype,
            "--outfile", str(out),
            "--model-name", f"taper-fixture-{name}",
        ]
        converter.main()
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
