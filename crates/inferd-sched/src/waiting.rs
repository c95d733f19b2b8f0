use std::cmp::Reverse;
use std::collections::BTreeMap;

use inferd_core::RequestId;

use crate::Sequence;

/// The waiting queue: highest priority first, then earliest arrival. A
/// preempted sequence keeps its arrival, so it goes back in front of the
/// sequences of its priority that arrived after it.
#[derive(Debug, Default)]
pub(crate) struct WaitingQueue {
    order: BTreeMap<(Reverse<i32>, u64), RequestId>,
}

impl WaitingQueue {
    fn key(seq: &Sequence) -> (Reverse<i32>, u64) {
        (Reverse(seq.priority), seq.arrival_seq)
    }

    pub(crate) fn push(&mut self, seq: &Sequence) {
        self.order.insert(Self::key(seq), seq.id);
    }

    pub(crate) fn remove(&mut self, seq: &Sequence) -> bool {
        self.order.remove(&Self::key(seq)).is_some()
    }

    pub(crate) fn front(&self) -> Option<RequestId> {
        self.order.first_key_value().map(|(_, &id)| id)
    }

    pub(crate) fn pop_front(&mut self) -> Option<RequestId> {
        self.order.pop_first().map(|(_, id)| id)
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}
