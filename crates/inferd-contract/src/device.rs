use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which backend runs the model: `cpu`, `cuda[:N]` or `neuron`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// An NVIDIA GPU by its CUDA ordinal.
    Cuda(usize),
    /// NeuronCores of AWS Inferentia2, driven by a step worker process.
    Neuron,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((k, n)) => (k, Some(n)),
            None => (lower.as_str(), None),
        };
        match (kind, ordinal) {
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("neuron", None) => Ok(DeviceSpec::Neuron),
            ("cuda", None) => Ok(DeviceSpec::Cuda(0)),
            ("cuda", Some(n)) => n.parse().map(DeviceSpec::Cuda).map_err(|_| {
                format!("invalid CUDA device ordinal {n:?} in {s:?} (expected cuda:0, cuda:1, ...)")
            }),
            ("cpu" | "neuron", Some(_)) => Err(format!(
                "device {kind} takes no ordinal, got {s:?} (NEURON_RT_VISIBLE_CORES picks NeuronCores)"
            )),
            _ => Err(format!("unknown device {s:?} (expected cpu, cuda, cuda:N or neuron)")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Neuron => f.write_str("neuron"),
        }
    }
}

/// Element type of activations (the compute dtype) or of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!("unknown dtype {other:?} (expected f32, f16 or bf16)")),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_with_and_without_ordinals() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("neuron".parse(), Ok(DeviceSpec::Neuron));
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains("ordinal"));
        assert!("cpu:1".parse::<DeviceSpec>().unwrap_err().contains("takes no ordinal"));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("expected cpu, cuda"));
        for d in [DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Neuron] {
            assert_eq!(d.to_string().parse(), Ok(d), "display and parse agree");
        }
    }

    #[test]
    fn dtypes_parse_by_common_names() {
        assert_eq!("bfloat16".parse(), Ok(DType::BF16));
        assert_eq!("half".parse(), Ok(DType::F16));
        assert_eq!(DType::BF16.size_in_bytes(), 2);
        assert!("int8".parse::<DType>().is_err());
        for d in [DType::F32, DType::F16, DType::BF16] {
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.as_str()), "serde names match the flags");
        }
    }
}
