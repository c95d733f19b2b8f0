//! Incremental detokenization and stop strings: text is emitted as tokens
//! arrive, never as broken UTF-8, and never past a stop string.

use std::sync::Arc;

use inferd_models::TextTokenizer;

/// Turns a growing token list into text deltas. Decodes a small window of
/// recent tokens each time and holds back text that ends in an incomplete
/// UTF-8 sequence (a replacement character) until the next token completes it.
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: Arc<TextTokenizer>,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<TextTokenizer>) -> Self {
        IncrementalDecoder { tokenizer, tokens: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, token: u32) -> String {
        self.tokens.push(token);
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        let prefix = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = decode(&self.tokens[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            delta
        } else {
            String::new()
        }
    }
}

/// Finds stop strings in streamed text. Text that could still be the start
/// of a stop string is held back until it is ruled out.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What the matcher lets out for one delta.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    pub text: String,
    /// True once a stop string matched; `text` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, held: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        self.held.push_str(delta);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome { text, stopped: true };
        }
        // Hold the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutcome { text, stopped: false }
    }

    /// Releases held text when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_deltas_is_found_and_cut() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome { text: "hello ".into(), stopped: false });
        assert_eq!(m.push("N"), StopOutcome { text: "".into(), stopped: false });
        assert_eq!(m.push("D and more"), StopOutcome { text: "".into(), stopped: true });
    }

    #[test]
    fn held_text_is_released_when_ruled_out_or_flushed() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("xE").text, "x");
        assert_eq!(m.push("Nx").text, "ENx");
        assert_eq!(m.push("EN").text, "");
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxabyy"), StopOutcome { text: "xx".into(), stopped: true });
    }
}
