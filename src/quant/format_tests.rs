//! Tests of the unit formats (Q4_0, Q4_K, Q6_K) and of every format's ggml
//! bytes: kernels against an f64 reference, quantization error, and
//! agreement with llama.cpp's gguf-py on fixtures.

use std::path::PathBuf;

use super::unit::{self, ScalarUnit, UnitActs, UnitFormat, LANES, UNIT};
use super::*;

/// Deterministic values: roughly normal (a sum of four uniforms) with a
/// per-row scale, an outlier now and then, and an all-zero stretch, so
/// blocks differ in range.
fn data(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 0.01 * (1 + r % 7) as f32;
        for c in 0..cols {
            let x = (uniform() + uniform() + uniform() + uniform()) * 0.87 * scale;
            v.push(if c % 97 == 5 {
                x * 8.0
            } else if r % 5 == 1 && c < 40 {
                0.0
            } else {
                x
            });
        }
    }
    v
}

/// `x · Wᵀ` in f64 from dense `x` and `w`.
fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, t: usize) -> Vec<f64> {
    let mut out = vec![0f64; t * rows];
    for k in 0..t {
        for r in 0..rows {
            out[k * rows + r] = (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[k * cols + c] as f64)
                .sum();
        }
    }
    out
}

/// Every kernel of this CPU (and the scalar one) on `m` against
/// dequantize-then-matmul in f64: within f32 rounding of the exact product
/// of the quantized operands, and within the activations' quantization
/// error of the product with the dense ones.
fn check_kernels<F: UnitFormat>(m: &F, x: &[f32], t: usize, label: &str) -> Result<()> {
    let (rows, cols) = (m.rows(), m.cols());
    let wd = unit::dequantize(m);
    let acts = UnitActs::quantize(x, t, cols, F::ACTS)?;
    let xd = acts.dequantize();
    let exact = reference(&wd, &xd, rows, cols, t);
    let dense = reference(&wd, x, rows, cols, t);
    // Per weight: |dl·q| + |ol|, the size of the terms the kernels sum
    // before they cancel (Q4_K's minimums, the offsets of Q4_0 and Q6_K).
    let mut terms = vec![0f64; rows * cols];
    let mut su = ScalarUnit::default();
    for r in 0..rows {
        for u in 0..m.units() {
            m.unit_scalar(r, u, &mut su);
            for j in 0..UNIT {
                let c = unit::column(F::ACTS, m.units(), u, j);
                if c >= cols {
                    continue;
                }
                let l = j / 8;
                let q = su.q[unit::POS[j] as usize] as f64;
                terms[r * cols + c] = (su.dl[l] as f64 * q).abs() + su.ol[l].abs() as f64;
            }
        }
    }
    let span = match F::ACTS {
        ActScale::Block32 => 32,
        ActScale::Super256 => 256,
    };
    let kernels = Kernel::available();
    assert!(kernels.contains(&Kernel::Scalar));
    for kernel in kernels {
        let y = unit::matmul(kernel, m, x, t)?;
        assert_eq!(y.len(), t * rows);
        for k in 0..t {
            let xr = &x[k * cols..(k + 1) * cols];
            let amax: Vec<f32> = xr
                .chunks(span)
                .map(|c| c.iter().fold(0f32, |a, v| a.max(v.abs())))
                .collect();
            for r in 0..rows {
                let i = k * rows + r;
                let (mut magnitude, mut act_bound) = (0f64, 0f64);
                for c in 0..cols {
                    magnitude += terms[r * cols + c] * (xd[k * cols + c] as f64).abs();
                    act_bound += (wd[r * cols + c] as f64).abs() * amax[c / span] as f64 / 254.0;
                }
                let got = y[i] as f64;
                let tol = 2e-6 * magnitude + 1e-7;
                assert!(
                    (got - exact[i]).abs() <= tol,
                    "{label} {kernel:?} [{rows}x{cols}] t={t} ({k},{r}): {got} vs {} (tol {tol})",
                    exact[i]
                );
                assert!(
                    (got - dense[i]).abs() <= act_bound * 1.001 + tol,
                    "{label} {kernel:?} [{rows}x{cols}] t={t} ({k},{r}): {got} vs dense {}",
                    dense[i]
                );
            }
        }
    }
    Ok(())
}

/// Shapes with odd row counts that divide into no chunk or row batch; rows
/// of one unit, an odd number of units (half a super-block at the end),
/// padding inside a unit; one token, token counts that are not a multiple of
/// the tile, and more than one task's block of 64 tokens.
const SHAPES: [(usize, usize, usize); 8] = [
    (37, 256, 1),
    (37, 896, 7),
    (131, 128, 3),
    (5, 300, 2),
    (200, 512, 5),
    (67, 4864, 4),
    (1001, 1024, 1),
    (33, 256, 70),
];

#[test]
fn every_kernel_matches_the_f64_reference_q4_0() -> Result<()> {
    for (rows, cols, t) in SHAPES {
        let m = Q40Matrix::quantize(&data(rows, cols, rows as u64), rows, cols)?;
        check_kernels(&m, &data(t, cols, 99), t, "q4_0")?;
    }
    Ok(())
}

#[test]
fn every_kernel_matches_the_f64_reference_q4_k() -> Result<()> {
    for (rows, cols, t) in SHAPES {
        let m = Q4KMatrix::quantize(&data(rows, cols, rows as u64), rows, cols)?;
        check_kernels(&m, &data(t, cols, 99), t, "q4_k")?;
    }
    Ok(())
}

#[test]
fn every_kernel_matches_the_f64_reference_q6_k() -> Result<()> {
    for (rows, cols, t) in SHAPES {
        let m = Q6KMatrix::quantize(&data(rows, cols, rows as u64), rows, cols)?;
        check_kernels(&m, &data(t, cols, 99), t, "q6_k")?;
    }
    Ok(())
}

/// Matrices adopted from ggml bytes with every field random (so scales,
/// minimums and high bits take all their values) through the kernels too.
#[test]
fn every_kernel_matches_the_f64_reference_on_random_ggml_blocks() -> Result<()> {
    for name in ["q4_0", "q4_k", "q6_k"] {
        let (bytes, _) = fixture(name);
        let x = data(3, 512, 5);
        match QMatrix::from_ggml_bytes(name.parse()?, &bytes, 3, 512)? {
            QMatrix::Q4_0(m) => check_kernels(&m, &x, 3, name)?,
            QMatrix::Q4K(m) => check_kernels(&m, &x, 3, name)?,
            QMatrix::Q6K(m) => check_kernels(&m, &x, 3, name)?,
            QMatrix::Q8_0(_) => unreachable!("not a unit format"),
        }
    }
    Ok(())
}

/// RMS of the error over RMS of the data, for normal-ish weights with
/// outliers. Measured: Q8_0 0.0085, Q6_K 0.025, Q4_K 0.088, Q4_0 0.135.
/// The bounds are those with 12–20% margin; the order is the formats'
/// (Q6_K's 6.5 bits beat Q4_K's 4.5, whose per-32 minimums beat Q4_0's
/// symmetric grid).
#[test]
fn round_trip_error_is_within_each_formats_bound() -> Result<()> {
    let (rows, cols) = (64, 1024);
    let x = data(rows, cols, 3);
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (mut s, mut n) = (0f64, 0usize);
        for v in v {
            s += (v as f64) * (v as f64);
            n += 1;
        }
        (s / n as f64).sqrt()
    };
    let data_rms = rms(&mut x.iter().copied());
    let mut errors = Vec::new();
    for (quant, bound) in [
        (Quant::Q8_0, 0.01),
        (Quant::Q6K, 0.03),
        (Quant::Q4K, 0.1),
        (Quant::Q4_0, 0.16),
    ] {
        let m = QMatrix::quantize(quant, &x, rows, cols)?;
        let y = m.dequantize();
        let rel = rms(&mut x.iter().zip(&y).map(|(a, b)| a - b)) / data_rms;
        eprintln!("{quant}: relative RMS error {rel:.5}");
        assert!(
            rel < bound,
            "{quant}: relative RMS error {rel} (bound {bound})"
        );
        errors.push(rel);
    }
    assert!(errors[1] < errors[2] && errors[2] < errors[3], "{errors:?}");
    Ok(())
}

/// A zero row stays zero in every format, and a row of one value keeps it
/// closely (the grid must reach the extremes).
#[test]
fn constant_rows_survive() -> Result<()> {
    let cols = 384;
    let mut x = vec![0f32; cols];
    x.extend(std::iter::repeat_n(0.25f32, cols));
    x.extend(std::iter::repeat_n(-0.25f32, cols));
    for quant in [Quant::Q6K, Quant::Q4K, Quant::Q4_0] {
        let y = QMatrix::quantize(quant, &x, 3, cols)?.dequantize();
        assert!(y[..cols].iter().all(|&v| v == 0.0), "{quant}");
        for (a, b) in x[cols..].iter().zip(&y[cols..]) {
            assert!((a - b).abs() < 0.25 * 0.01, "{quant}: {a} came back as {b}");
        }
    }
    Ok(())
}

#[test]
fn bytes_per_weight_at_real_widths() -> Result<()> {
    // Q4_K: 128 bytes of nibbles and 20 of scales per 256 (ggml packs the
    // scales into 16); Q6_K and Q4_0 take exactly ggml's bytes.
    for (quant, want) in [
        (Quant::Q4K, 148.0 / 256.0),
        (Quant::Q6K, 210.0 / 256.0),
        (Quant::Q4_0, 18.0 / 32.0),
    ] {
        for (rows, cols) in [(8, 1024), (8, 4864)] {
            let m = QMatrix::quantize(quant, &vec![0.5; rows * cols], rows, cols)?;
            let per_weight = m.size_bytes() as f64 / (rows * cols) as f64;
            assert!(
                (per_weight - want).abs() < 1e-9,
                "{quant} at {cols}: {per_weight}"
            );
        }
    }
    // 896 = 3.5 super-blocks: half a super-block's scales are unused.
    let m = QMatrix::quantize(Quant::Q4K, &vec![0.5; 896], 1, 896)?;
    assert_eq!(m.size_bytes(), 7 * 64 + 4 * 20);
    Ok(())
}

#[test]
fn bad_shapes_are_errors() {
    for quant in [Quant::Q6K, Quant::Q4K, Quant::Q4_0] {
        assert!(QMatrix::quantize(quant, &[1.0; 10], 3, 4).is_err());
        assert!(QMatrix::quantize(quant, &[], 0, 4).is_err());
        let m = QMatrix::quantize(quant, &[1.0; 64], 2, 32).expect("quantize");
        assert!(m.matmul(&[1.0; 33], 1).is_err());
        assert!(m.matmul(&[1.0; 32], 2).is_err());
    }
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant")
        .join(name)
}

fn read_f32(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `{name}.bin` (ggml blocks of a [3, 512] tensor) and `{name}.f32` (what
/// gguf-py dequantizes them to), made by scripts/make_quant_fixtures.py.
fn fixture(name: &str) -> (Vec<u8>, Vec<f32>) {
    let bin = format!("{name}.bin");
    let bytes = std::fs::read(fixture_path(&bin)).unwrap_or_else(|e| panic!("{bin}: {e}"));
    (bytes, read_f32(&format!("{name}.f32")))
}

/// ggml's bytes are read as llama.cpp reads them: dequantizing gives
/// exactly gguf-py's values (same operations in f32), and writing them back
/// gives the same bytes.
#[test]
fn ggml_fixtures_dequantize_as_gguf_py_does() -> Result<()> {
    for name in ["q8_0", "q4_0", "q4_k", "q6_k"] {
        let (bytes, want) = fixture(name);
        let m = QMatrix::from_ggml_bytes(name.parse()?, &bytes, 3, 512)?;
        assert_eq!((m.rows(), m.cols()), (3, 512));
        let got = m.dequantize();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0),
                "{name}[{i}]: {g} vs gguf-py {w}"
            );
        }
        assert!(m.to_ggml_bytes()? == bytes, "{name}: bytes changed");
    }
    Ok(())
}

/// Our quantizers follow llama.cpp's reference ones (`quantize_row_*_ref`)
/// closely enough to give the same blocks, bit for bit: Q8_0 and Q4_0
/// against gguf-py (which reproduces them exactly), Q4_K and Q6_K against
/// ggml-quants.c itself, on weights with outliers, a zero sub-block and a
/// constant super-block. (Q8_0 rounds halves to even where llama.cpp rounds
/// them away from zero; random data has no exact halves.)
#[test]
fn quantizers_give_llama_cpps_blocks() -> Result<()> {
    for (name, rows) in [("q8_0", 3), ("q4_0", 3), ("q4_k", 16), ("q6_k", 16)] {
        let src = read_f32(&format!("{name}-src.f32"));
        let want = std::fs::read(fixture_path(&format!("{name}-quantized.bin")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let m = QMatrix::quantize(name.parse()?, &src, rows, 512)?;
        let got = m.to_ggml_bytes()?;
        let (_, block) = m.format().ggml_block().expect("a block");
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.chunks(block).zip(want.chunks(block)).enumerate() {
            assert!(g == w, "{name}: block {i} differs from llama.cpp's");
        }
    }
    Ok(())
}

/// Our own quantizations survive a trip through ggml's layout, and
/// misshapen bytes are errors that say what is wrong.
#[test]
fn ggml_bytes_round_trip_and_are_checked() -> Result<()> {
    let x = data(5, 768, 11);
    for quant in [Quant::Q8_0, Quant::Q6K, Quant::Q4K, Quant::Q4_0] {
        let m = QMatrix::quantize(quant, &x, 5, 768)?;
        let bytes = m.to_ggml_bytes()?;
        let (block, block_bytes) = quant.ggml_block().expect("a block");
        assert_eq!(bytes.len(), 5 * 768 / block * block_bytes);
        let back = QMatrix::from_ggml_bytes(quant, &bytes, 5, 768)?;
        assert_eq!(back.format(), quant);
        assert_eq!(back.dequantize(), m.dequantize(), "{quant}");
        let xs = data(2, 768, 12);
        assert_eq!(back.matmul(&xs, 2)?, m.matmul(&xs, 2)?, "{quant}");

        let err = QMatrix::from_ggml_bytes(quant, &bytes[1..], 5, 768)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bytes") && err.contains(&bytes.len().to_string()),
            "{err}"
        );
        let err = QMatrix::from_ggml_bytes(quant, &bytes, 5, 768 + 16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("784") && err.contains(&block.to_string()),
            "{err}"
        );
        assert!(QMatrix::from_ggml_bytes(quant, &[], 0, 768).is_err());
    }
    // Rows ggml cannot hold (taper pads them) do not become ggml bytes.
    for quant in [Quant::Q6K, Quant::Q4K] {
        let m = QMatrix::quantize(quant, &data(2, 896, 1), 2, 896)?;
        let err = m.to_ggml_bytes().unwrap_err().to_string();
        assert!(err.contains("896"), "{err}");
    }
    assert!(QMatrix::from_ggml_bytes(Quant::None, &[], 1, 32).is_err());
    Ok(())
}

/// The scalar decoder of each unit format against gguf-py's values of the
/// same ggml blocks, weight by weight, through the format's own formula.
/// (The SIMD decoders are checked through the kernels, above.)
#[test]
fn scalar_units_decode_the_ggml_values() -> Result<()> {
    fn check<F: UnitFormat>(m: &F, want: &[f32], name: &str) {
        let mut su = ScalarUnit::default();
        for r in 0..m.rows() {
            for u in 0..m.units() {
                m.unit_scalar(r, u, &mut su);
                for j in 0..UNIT {
                    let l = j / 8;
                    assert!(l < LANES);
                    let v = F::weight(su.dl[l], su.ol[l], su.q[unit::POS[j] as usize]);
                    let c = unit::column(F::ACTS, m.units(), u, j);
                    let w = want[r * m.cols() + c];
                    assert_eq!(v.to_bits(), w.to_bits(), "{name} ({r}, {c})");
                }
            }
        }
    }
    for name in ["q4_k", "q6_k", "q4_0"] {
        let (bytes, want) = fixture(name);
        match QMatrix::from_ggml_bytes(name.parse()?, &bytes, 3, 512)? {
            QMatrix::Q4K(q) => check(&q, &want, name),
            QMatrix::Q6K(q) => check(&q, &want, name),
            QMatrix::Q4_0(q) => check(&q, &want, name),
            QMatrix::Q8_0(_) => unreachable!("not a unit format"),
        }
    }
    Ok(())
}
