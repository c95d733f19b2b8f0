//! Admission control: a bound on requests and tokens waiting for the engine.
//! A request that does not fit is refused at once with 503 and a
//! `Retry-After` estimated from how fast the queue has been draining,
//! instead of queueing without limit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::ApiError;

/// How long a window of recent schedulings the drain rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(30);

/// The waiting-queue bounds and what currently waits.
#[derive(Debug)]
pub struct Admission {
    max_requests: usize,
    max_tokens: usize,
    waiting_requests: AtomicUsize,
    waiting_tokens: AtomicUsize,
    /// When recent sequences left the queue (were first scheduled).
    drained: Mutex<VecDeque<Instant>>,
}

/// One admitted sequence's place in the queue; leaving the queue (being
/// scheduled) or being dropped gives it back.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    tokens: usize,
    waiting: bool,
}

impl Admission {
    pub fn new(max_requests: usize, max_tokens: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_requests,
            max_tokens,
            waiting_requests: AtomicUsize::new(0),
            waiting_tokens: AtomicUsize::new(0),
            drained: Mutex::new(VecDeque::new()),
        })
    }

    /// Sequences waiting now.
    pub fn waiting_requests(&self) -> usize {
        self.waiting_requests.load(Ordering::Relaxed)
    }

    /// Seconds until the queue has room again at the recent drain rate; at
    /// least 1, at most 60.
    pub fn retry_after_secs(&self) -> u64 {
        let now = Instant::now();
        let rate = match self.drained.lock() {
            Ok(mut d) => {
                while d.front().is_some_and(|t| now.duration_since(*t) > RATE_WINDOW) {
                    d.pop_front();
                }
                // Over the busy part of the window only: idle time before the
                // first recent scheduling says nothing about the drain rate.
                let span =
                    d.front().map_or(RATE_WINDOW, |t| now.duration_since(*t)).max(Duration::from_secs(1));
                d.len() as f64 / span.as_secs_f64()
            }
            Err(_) => 0.0,
        };
        if rate <= 0.0 {
            return 5;
        }
        let backlog = self.waiting_requests() as f64 + 1.0;
        (backlog / rate).ceil().clamp(1.0, 60.0) as u64
    }

    /// Refuses with 400 a request that could never be admitted, even into
    /// an empty queue: retrying it would never help.
    pub fn check_fits(&self, seqs: usize, tokens_each: usize) -> Result<(), ApiError> {
        if seqs > self.max_requests {
            return Err(ApiError::invalid(
                format!(
                    "This request asks for {seqs} sequences (n times the number of prompts), more than the server's waiting queue holds ({}, --max-waiting-requests). Lower n or send fewer prompts.",
                    self.max_requests
                ),
                "n",
            ));
        }
        let tokens = seqs.saturating_mul(tokens_each);
        if tokens > self.max_tokens {
            return Err(ApiError::invalid(
                format!(
                    "This request may use up to {tokens} tokens (prompt + max_tokens for each of {seqs} sequences), more than the server's waiting queue holds ({}, --max-waiting-tokens). Lower max_tokens or n.",
                    self.max_tokens
                ),
                "max_tokens",
            ));
        }
        Ok(())
    }

    /// Admits `seqs` sequences of `tokens_each` tokens (prompt + max_tokens),
    /// all or none. A request larger than the bounds themselves is a 400;
    /// one that does not fit now is a 503 with `Retry-After`.
    pub fn admit(self: &Arc<Self>, seqs: usize, tokens_each: usize) -> Result<Vec<Permit>, ApiError> {
        self.check_fits(seqs, tokens_each)?;
        let tokens = seqs * tokens_each;
        let reqs_before = self.waiting_requests.fetch_add(seqs, Ordering::AcqRel);
        let toks_before = self.waiting_tokens.fetch_add(tokens, Ordering::AcqRel);
        if reqs_before + seqs > self.max_requests || toks_before + tokens > self.max_tokens {
            self.waiting_requests.fetch_sub(seqs, Ordering::AcqRel);
            self.waiting_tokens.fetch_sub(tokens, Ordering::AcqRel);
            return Err(ApiError::Overloaded { retry_after_secs: self.retry_after_secs() });
        }
        Ok((0..seqs)
            .map(|_| Permit { admission: self.clone(), tokens: tokens_each, waiting: true })
            .collect())
    }
}

impl Permit {
    /// True until the sequence is first scheduled.
    pub fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// The sequence left the queue: it runs now.
    pub fn scheduled(&mut self) {
        if std::mem::replace(&mut self.waiting, false) {
            self.admission.waiting_requests.fetch_sub(1, Ordering::AcqRel);
            self.admission.waiting_tokens.fetch_sub(self.tokens, Ordering::AcqRel);
            if let Ok(mut d) = self.admission.drained.lock() {
                d.push_back(Instant::now());
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.waiting {
            self.admission.waiting_requests.fetch_sub(1, Ordering::AcqRel);
            self.admission.waiting_tokens.fetch_sub(self.tokens, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_requests_and_tokens_and_gives_back_on_schedule_or_drop() {
        let a = Admission::new(3, 100);
        let mut two = a.admit(2, 30).unwrap();
        assert!(a.admit(2, 10).is_err(), "4 requests > 3");
        assert!(a.admit(1, 41).is_err(), "101 tokens > 100");
        assert_eq!(a.waiting_requests(), 2);
        two[0].scheduled();
        assert_eq!(a.waiting_requests(), 1);
        drop(two);
        assert_eq!(a.waiting_requests(), 0);
        assert!(a.admit(3, 33).is_ok());
        assert_eq!(a.waiting_requests(), 0, "dropped permits give their place back");
    }

    #[test]
    fn refusal_is_a_503_with_retry_after_of_at_least_one_second() {
        let a = Admission::new(1, 10);
        let _held = a.admit(1, 5).unwrap();
        match a.admit(1, 5) {
            Err(ApiError::Overloaded { retry_after_secs }) => assert!(retry_after_secs >= 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_larger_than_the_bounds_is_a_400_not_a_retry() {
        let a = Admission::new(4, 100);
        let err = a.admit(5, 1).unwrap_err();
        assert!(matches!(err, ApiError::Invalid { .. }), "{err:?}");
        assert!(err.message().contains("--max-waiting-requests"), "{}", err.message());
        assert_eq!(err.retry_after_secs(), None);
        let err = a.admit(2, 51).unwrap_err();
        assert!(err.message().contains("102 tokens") && err.message().contains("--max-waiting-tokens"));
        assert!(a.admit(usize::MAX, usize::MAX).is_err(), "no overflow");
        assert_eq!(a.waiting_requests(), 0);
        assert!(a.admit(4, 25).is_ok(), "exactly the bounds fit");
    }
}
