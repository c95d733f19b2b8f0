use inferd_core::{TokenId, TokenLogprobs};
use serde::{Deserialize, Serialize};

use crate::ExecError;

/// `(rows, vocab_size)` f32 logits on the host, row-major, one row per
/// `ModelInput::logits_rows` in that order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logits {
    pub vocab_size: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// Wraps `data`, checking that it holds whole rows.
    pub fn new(data: Vec<f32>, vocab_size: usize) -> Result<Self, ExecError> {
        if vocab_size == 0 || !data.len().is_multiple_of(vocab_size) {
            return Err(ExecError::Backend(format!(
                "{} logits are not whole rows of {vocab_size}",
                data.len()
            )));
        }
        Ok(Logits { vocab_size, data })
    }

    pub fn num_rows(&self) -> usize {
        self.data.len().checked_div(self.vocab_size).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }

    /// Every row as its own vector (tests, references).
    pub fn to_rows(&self) -> Vec<Vec<f32>> {
        self.data.chunks(self.vocab_size.max(1)).map(<[f32]>::to_vec).collect()
    }
}

/// A token a backend sampled on its device, with its logprobs when the
/// request asked for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    pub token: TokenId,
    pub logprobs: Option<TokenLogprobs>,
}

/// What one step returns, one entry per `ModelInput::logits_rows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelOutput {
    /// The engine samples each row with the request's own parameters.
    Logits(Logits),
    /// The backend sampled already (Neuron always does).
    Sampled(Vec<SampledToken>),
}

impl ModelOutput {
    /// Rows (or tokens) returned.
    pub fn num_rows(&self) -> usize {
        match self {
            ModelOutput::Logits(l) => l.num_rows(),
            ModelOutput::Sampled(s) => s.len(),
        }
    }

    /// The logits, for callers that know the backend returns them.
    pub fn into_logits(self) -> Result<Logits, ExecError> {
        match self {
            ModelOutput::Logits(l) => Ok(l),
            ModelOutput::Sampled(_) => {
                Err(ExecError::Backend("the backend returned sampled tokens, not logits".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_hold_whole_rows() {
        let l = Logits::new(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 3).unwrap();
        assert_eq!(l.num_rows(), 2);
        assert_eq!(l.row(1), [3.0, 4.0, 5.0]);
        assert!(Logits::new(vec![0.0; 5], 3).is_err());
        assert!(Logits::new(vec![], 0).is_err());
        assert_eq!(ModelOutput::Logits(l).num_rows(), 2);
    }
}
