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

`src/quant/` tests (`ggml_fixtures_*`) load these. Run by hand when they
need remaking:

    python scripts/make_quant_fixtures.py

It needs numpy and llama.cpp's gguf-py (`pip install gguf`, or
`pip install LLAMA_CPP_DIR/gguf-py`).
"""

from __future__ import annotations

import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

ROWS, COLS = 3, 512
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"

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


def main() -> None:
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


if __name__ == "__main__":
    main()
