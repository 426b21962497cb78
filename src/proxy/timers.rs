//! The sessions' deadlines in one heap, so the loop sleeps until the next one
//! and an idle connection costs nothing between its deadlines.
//!
//! Lazy: a deadline that moves later (a relay's idle timeout, with every
//! byte) is not rescheduled; the earlier entry fires, the session finds
//! nothing due and asks again for its new deadline. Entries of sessions that
//! closed, or whose deadline moved earlier, are told apart by the slot's
//! generation and time and dropped when they come up, or all at once when
//! they outnumber the live ones.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Entry>>,
    /// By session key: what the live entry is, if any.
    slots: Vec<Slot>,
    /// Slots with a live entry.
    live: usize,
}

/// Dead entries kept at the most beyond twice the live ones.
const DEAD_SLACK: usize = 1024;

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    at: Instant,
    key: usize,
    generation: u64,
}

#[derive(Default, Clone, Copy)]
struct Slot {
    generation: u64,
    at: Option<Instant>,
}

impl Timers {
    /// Wake session `key` at `at`, unless it is woken earlier already (it
    /// asks again then).
    pub fn schedule(&mut self, key: usize, at: Instant) {
        if self.slots.len() <= key {
            self.slots.resize(key + 1, Slot::default());
        }
        let slot = &mut self.slots[key];
        match slot.at {
            Some(scheduled) if scheduled <= at => return,
            Some(_) => {}
            None => self.live += 1,
        }
        slot.at = Some(at);
        self.heap.push(Reverse(Entry {
            at,
            key,
            generation: slot.generation,
        }));
        self.drop_dead_when_many();
    }

    /// Session `key` is gone: its entries are dead, whoever takes the key next.
    pub fn forget(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.generation += 1;
            if slot.at.take().is_some() {
                self.live -= 1;
            }
        }
        self.drop_dead_when_many();
    }

    /// The earliest entry (perhaps a dead one: waking for it is harmless).
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// The sessions whose deadline has come, each once; they are unscheduled
    /// until they ask again.
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        while let Some(Reverse(entry)) = self.heap.peek() {
            if entry.at > now {
                break;
            }
            let Some(Reverse(entry)) = self.heap.pop() else {
                break;
            };
            if let Some(slot) = self.slots.get_mut(entry.key) {
                if slot.is_live(&entry) {
                    slot.at = None;
                    self.live -= 1;
                    due.push(entry.key);
                }
            }
        }
        due
    }

    /// Sessions that close long before their deadline (an idle timeout of
    /// minutes) would otherwise leave their entries until then.
    fn drop_dead_when_many(&mut self) {
        if self.heap.len() > 2 * self.live + DEAD_SLACK {
            let slots = &self.slots;
            self.heap
                .retain(|Reverse(e)| slots.get(e.key).is_some_and(|s| s.is_live(e)));
        }
    }
}

impl Slot {
    fn is_live(&self, entry: &Entry) -> bool {
        self.generation == entry.generation && self.at == Some(entry.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Empty timers, and a clock in milliseconds from now.
    fn timers() -> (Timers, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        (Timers::default(), move |ms| t0 + Duration::from_millis(ms))
    }

    #[test]
    fn sessions_come_due_in_order_once_each() {
        let (mut timers, at) = timers();
        timers.schedule(2, at(30));
        timers.schedule(0, at(10));
        timers.schedule(1, at(20));
        assert_eq!(timers.next(), Some(at(10)));
        assert_eq!(timers.due(at(5)), Vec::<usize>::new());
        assert_eq!(timers.due(at(20)), vec![0, 1]);
        assert_eq!(timers.due(at(20)), Vec::<usize>::new());
        assert_eq!(timers.due(at(100)), vec![2]);
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn a_later_deadline_waits_for_the_earlier_entry_and_an_earlier_one_replaces_it() {
        let (mut timers, at) = timers();
        timers.schedule(0, at(10));
        // Moved later: the 10 ms entry still fires, and the session asks again.
        timers.schedule(0, at(50));
        assert_eq!(timers.due(at(10)), vec![0]);
        timers.schedule(0, at(50));
        // Moved earlier: 20 ms fires, the 50 ms entry is dead.
        timers.schedule(0, at(20));
        assert_eq!(timers.due(at(20)), vec![0]);
        assert_eq!(timers.due(at(60)), Vec::<usize>::new());
    }

    #[test]
    fn a_closed_sessions_entry_does_not_wake_the_next_one_at_its_key() {
        let (mut timers, at) = timers();
        timers.schedule(3, at(10));
        timers.forget(3);
        assert_eq!(timers.due(at(10)), Vec::<usize>::new());
        // The key taken again, with the very same deadline.
        timers.schedule(3, at(10));
        timers.forget(3);
        timers.schedule(3, at(40));
        assert_eq!(timers.due(at(30)), Vec::<usize>::new());
        assert_eq!(timers.due(at(40)), vec![3]);
    }

    #[test]
    fn the_dead_entries_of_closed_sessions_do_not_pile_up() {
        let (mut timers, at) = timers();
        for key in 0..100_000 {
            timers.schedule(key % 10, at(300_000));
            timers.forget(key % 10);
        }
        timers.schedule(7, at(1));
        assert!(timers.heap.len() <= DEAD_SLACK + 3, "{}", timers.heap.len());
        assert_eq!(timers.due(at(300_000)), vec![7]);
    }
}
