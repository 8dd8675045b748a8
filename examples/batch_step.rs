use std::time::Instant;
use candle_core::{DType, Device, Tensor};
use taper::models::{Logits, SeqInput};

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let files = taper::hub::resolve(&taper::hub::ModelSource::Local(dir), &taper::hub::HubOptions::from_env())?;
    let p = taper::pipeline::Pipeline::load(&files, DType::F32, &Device::Cpu, std::env::args().nth(2).map(|q| q.parse().unwrap()).unwrap_or(taper::quant::Quant::None), None)?;
    let m = &p.model;
    for &b in &[1usize, 4, 8, 16] {
        let mut caches: Vec<_> = (0..b).map(|_| m.new_cache()).collect();
        let prompt: Vec<u32> = (0..32).map(|t| t * 17 + 5).collect();
        {
            let mut inputs: Vec<SeqInput> = caches.iter_mut().map(|c| SeqInput { tokens: &prompt, cache: c, logits: Logits::Last }).collect();
            m.forward(&mut inputs)?;
        }
        let tok = [42u32];
        let n = 6;
        let t = Instant::now();
        for _ in 0..n {
            let mut inputs: Vec<SeqInput> = caches.iter_mut().map(|c| SeqInput { tokens: &tok, cache: c, logits: Logits::Last }).collect();
            m.forward(&mut inputs)?;
        }
        let s = t.elapsed().as_secs_f64() / n as f64;
        println!("batch {b}: {:.1} ms/step, {:.1} tok/s", s * 1e3, b as f64 / s);
    }
    for &rows in &[1usize, 16, 64] {
        let x = Tensor::randn(0f32, 1., (rows, 896), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (4864, 896), &Device::Cpu)?;
        let _ = x.matmul(&w.t()?)?;
        let t = Instant::now();
        for _ in 0..20 { let _ = x.matmul(&w.t()?)?; }
        let s = t.elapsed().as_secs_f64() / 20.0;
        println!("matmul {rows}x896x4864: {:.2} ms, {:.1} GFLOPS", s * 1e3, 2.0 * rows as f64 * 896.0 * 4864.0 / s / 1e9);
    }
    Ok(())
}
