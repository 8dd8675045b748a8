//! `--device` and `--dtype`: which candle device runs the model, in which
//! precision.
//!
//! GPU backends are cargo features passed through to candle; asking for one
//! the binary was built without is an error that says which feature to build
//! with, never a silent fall-back to the CPU.

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::{Error, Result};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| {
                    Error::Device(format!(
                        "--device '{s}': the CUDA ordinal must be a number, as in cuda:1"
                    ))
                }),
                None => Err(Error::Device(format!(
                    "--device '{s}' is not one of cpu, cuda, cuda:N, metal"
                ))),
            },
        }
    }
}

impl DeviceSpec {
    /// Opens the device, or explains how to get it.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Device(
                        "this taper was built without CUDA: rebuild with `cargo build --release --features cuda`".into(),
                    ));
                }
                Device::new_cuda(ordinal)
                    .map_err(|e| Error::Device(format!("cannot open CUDA device {ordinal}: {e}")))
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(Error::Device(
                        "this taper was built without Metal: rebuild with `cargo build --release --features metal`".into(),
                    ));
                }
                Device::new_metal(0)
                    .map_err(|e| Error::Device(format!("cannot open the Metal device: {e}")))
            }
        }
    }
}

/// `--dtype` as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeSpec {
    Auto,
    F32,
    F16,
    BF16,
}

impl FromStr for DTypeSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(Error::Device(format!(
                "--dtype '{other}' is not one of auto, f32, f16, bf16"
            ))),
        }
    }
}

impl DTypeSpec {
    /// The dtype to compute in. `auto` is f32 on the CPU, where candle's
    /// half-precision matmuls widen to f32 anyway and so only cost time, and
    /// bf16 on GPUs, whose range matches the checkpoints most models ship.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::Auto => {
                if device.is_cpu() {
                    DType::F32
                } else {
                    DType::BF16
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() -> Result<()> {
        assert_eq!("cpu".parse::<DeviceSpec>()?, DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>()?, DeviceSpec::Cuda(0));
        assert_eq!("CUDA:2".parse::<DeviceSpec>()?, DeviceSpec::Cuda(2));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        Ok(())
    }

    #[test]
    fn auto_is_f32_on_cpu() -> Result<()> {
        assert_eq!(
            "auto".parse::<DTypeSpec>()?.resolve(&Device::Cpu),
            DType::F32
        );
        assert_eq!(
            "bf16".parse::<DTypeSpec>()?.resolve(&Device::Cpu),
            DType::BF16
        );
        assert!("int4".parse::<DTypeSpec>().is_err());
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
