//! What a sequence's next token may be, beyond its sampling parameters: a
//! grammar (structured output) decides it token by token.

use crate::TokenId;

/// One sequence's constraint: asked for the tokens allowed next before each
/// sample, told each token sampled. Implementations live outside the engine
/// (inferd-grammar); the engine only masks and advances.
pub trait TokenConstraint: Send + std::fmt::Debug {
    /// Writes the tokens allowed next into `mask`, one bit per token id
    /// (bit `t % 32` of word `t / 32`); every bit is overwritten. Once the
    /// constraint is satisfied only the end-of-sequence token is allowed.
    fn allowed(&mut self, mask: &mut [u32]) -> Result<(), String>;

    /// Advances past the token sampled.
    fn consume(&mut self, token: TokenId) -> Result<(), String>;

    /// Whether the constraint is satisfied and allows nothing but the end.
    fn is_finished(&self) -> bool;
}

/// Whether bit `token` is set in `mask`.
pub fn mask_allows(mask: &[u32], token: TokenId) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

/// Sets bit `token` in `mask`.
pub fn mask_allow(mask: &mut [u32], token: TokenId) {
    mask[token as usize / 32] |= 1 << (token % 32);
}
