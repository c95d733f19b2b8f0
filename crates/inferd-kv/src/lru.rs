//! An intrusive doubly linked list over block indices: O(1) push to the back,
//! pop from the front and removal from the middle (a prefix hit on a block
//! that waits for eviction).

const NIL: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct LruList {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl LruList {
    pub(crate) fn new(capacity: usize) -> Self {
        LruList {
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
            linked: vec![false; capacity],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, i: u32) -> bool {
        self.linked[i as usize]
    }

    /// Appends `i` as the most recently used entry.
    pub(crate) fn push_back(&mut self, i: u32) {
        debug_assert!(!self.contains(i));
        let idx = i as usize;
        self.prev[idx] = self.tail;
        self.next[idx] = NIL;
        if self.tail == NIL {
            self.head = i;
        } else {
            self.next[self.tail as usize] = i;
        }
        self.tail = i;
        self.linked[idx] = true;
        self.len += 1;
    }

    /// Unlinks `i`, wherever it is.
    pub(crate) fn remove(&mut self, i: u32) {
        debug_assert!(self.contains(i));
        let idx = i as usize;
        let (p, n) = (self.prev[idx], self.next[idx]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[idx] = NIL;
        self.next[idx] = NIL;
        self.linked[idx] = false;
        self.len -= 1;
    }

    /// Removes and returns the least recently used entry.
    pub(crate) fn pop_front(&mut self) -> Option<u32> {
        let head = self.head;
        if head == NIL {
            return None;
        }
        self.remove(head);
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_insertion_order_and_skips_removed() {
        let mut lru = LruList::new(8);
        for i in [3, 1, 4, 5] {
            lru.push_back(i);
        }
        lru.remove(4);
        assert!(!lru.contains(4));
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.pop_front(), Some(3));
        lru.push_back(3);
        assert_eq!(lru.pop_front(), Some(1));
        assert_eq!(lru.pop_front(), Some(5));
        assert_eq!(lru.pop_front(), Some(3));
        assert_eq!(lru.pop_front(), None);
        assert_eq!(lru.len(), 0);
    }

    #[test]
    fn removing_head_and_tail_keeps_links_sound() {
        let mut lru = LruList::new(4);
        for i in 0..4 {
            lru.push_back(i);
        }
        lru.remove(0);
        lru.remove(3);
        assert_eq!(lru.pop_front(), Some(1));
        assert_eq!(lru.pop_front(), Some(2));
        assert_eq!(lru.pop_front(), None);
    }
}
