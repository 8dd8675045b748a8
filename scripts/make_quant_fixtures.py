"""Make tests/fixtures/quant/: ggml-format weight blocks and what llama.cpp's
own gguf-py makes of them, so taper's ggml import is checked against an
implementation that is not taper's.

For each of Q8_0, Q4_0, Q4_K and Q6_K, a [3, 512] tensor (two super-blocks
a row) of blocks with random quants and random, finite f16 scales:

    {type}.bin     the ggml block bytes, rows one after another (GGUF's layout)
    {type}.f32     gguf.quants.dequantize of them, little-endian f32

and for Q8_0 and Q4_0, whose reference quantizers gguf-py implements
bit-exactly:

    {type}-src.f32        seeded random f32 weights, [3, 512]
    {type}-quantized.bin  gguf.quants.quantize of them

and for Q4_K and Q6_K, whose quantizers gguf-py lacks, llama.cpp's own C
reference (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref` in
ggml-quants.c, built here with scripts/ggml_ref/quantize_ref.c):

    {type}-src.f32        seeded random f32 weights with outliers, [16, 512]
    {type}-quantized.bin  the reference quantizer's blocks

`src/quant/` tests (`ggml_fixtures_*`) load these. Run by hand when they
need remaking:

    python scripts/make_quant_fixtures.py [LLAMA_CPP_DIR]

It needs numpy, llama.cpp's gguf-py (`pip install gguf`, or
`pip install LLAMA_CPP_DIR/gguf-py`) and a C compiler; LLAMA_CPP_DIR (whose
ggml/src/ggml-quants.c is compiled) defaults to the tree
`scripts/compare_peers.sh` unpacks under target/peers/.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

ROWS, COLS = 3, 512
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quant"
LLAMA_CPP = ROOT / "target/peers/llama_cpp_python-0.3.36/vendor/llama.cpp"

# (type, weights per block, bytes per block, byte offsets of f16 scales)
LAYOUTS = {
    "q8_0": (T.Q8_0, 32, 34, [0]),
    "q4_0": (T.Q4_0, 32, 18, [0]),
    "q4_k": (T.Q4_K, 256, 144, [0, 2]),
    "q6_k": (T.Q6_K, 256, 210, [208]),
}


def random_blocks(rng: np.random.Generator, block: int, size: int, scales: list[int]) -> np.ndarray:
    n = ROWS * COLS // block
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in scales:
        # Positive and negative scales of varied size, all finite.
        d = (rng.standard_normal(n) * 0.01).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(n, 2)
    return blocks


def reference_quantizer(llama_cpp: pathlib.Path, build: pathlib.Path) -> pathlib.Path:
    """Builds scripts/ggml_ref/quantize_ref.c against llama.cpp's ggml-quants.c."""
    ggml = llama_cpp / "ggml"
    exe = build / "quantize_ref"
    subprocess.run(
        [
            "cc", "-O2", "-o", str(exe),
            str(ROOT / "scripts/ggml_ref/quantize_ref.c"),
            str(ggml / "src/ggml-quants.c"),
            f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", "-lm",
        ],
        check=True,
    )
    return exe


def main() -> None:
    llama_cpp = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else LLAMA_CPP
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240531)
    for name, (qtype, block, size, scales) in LAYOUTS.items():
        blocks = random_blocks(rng, block, size, scales)
        data = blocks.reshape(ROWS, COLS // block * size)
        values = quants.dequantize(data, qtype).astype("<f4")
        assert values.shape == (ROWS, COLS), values.shape
        assert np.isfinite(values).all()
        (OUT / f"{name}.bin").write_bytes(data.tobytes())
        (OUT / f"{name}.f32").write_bytes(values.tobytes())
        if name in ("q8_0", "q4_0"):
            src = (rng.standard_normal((ROWS, COLS)) * 0.05).astype(np.float32)
            src[1, 40:72] = 0.0  # an all-zero block
            (OUT / f"{name}-src.f32").write_bytes(src.astype("<f4").tobytes())
            (OUT / f"{name}-quantized.bin").write_bytes(quants.quantize(src, qtype).tobytes())
        print(f"{name}: {data.nbytes} bytes of blocks")
    with tempfile.TemporaryDirectory() as build:
        exe = reference_quantizer(llama_cpp, pathlib.Path(build))
        for name in ("q4_k", "q6_k"):
            src = (rng.standard_normal((16, 512)) * 0.02).astype(np.float32)
            src[rng.random(src.shape) < 0.01] *= 8  # outliers, as real weights have
            src[3, 64:96] = 0.0  # an all-zero sub-block
            src[5, :256] = 0.01  # a constant super-block
            src_path = OUT / f"{name}-src.f32"
            src_path.write_bytes(src.astype("<f4").tobytes())
            out = OUT / f"{name}-quantized.bin"
            subprocess.run([str(exe), name, str(src_path), str(src.size), str(out)], check=True)
            print(f"{name}: llama.cpp's reference quantization, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
