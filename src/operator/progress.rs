//! What the coordinator waits for: commits to acknowledge, and per entity the process-status
//! items to store once the operators that listen to that entity are done with them.
//!
//! ```text
//!  dispatcher ─► Pending { end_lsn, per entity: (newest item, listening operators) }
//!                   │
//!                   ├─► commits: end LSNs, in WAL order ─► ack = last end every operator is done through
//!                   └─► per entity: items in WAL order ─► stored once its listeners are done through them
//! ```
//!
//! # Progress
//!
//! An entity's item is stored as soon as every operator listening to that entity is done
//! through the item's commit, so an operator that is halted (or slow) on another entity never
//! holds back the process status of this one; an entity no operator listens to is processed
//! as soon as it is received. The slot is acknowledged to a commit only when every operator
//! is done through it and every item up to it has been stored: acknowledgement waits for all.
//!
//! Memory stays bounded: past [`MAX_PENDING`] entries, each two neighbours of a queue are
//! merged into one (coarser, never wrong: a merged entry is ready only when its newer half
//! is). Merging neighbours all along the queue, not the two oldest again and again, keeps the
//! oldest entries near the operators' position: while operators stay more than
//! `MAX_PENDING` commits behind the reader (an inbox holds megabytes of events), the oldest
//! entry would otherwise be dragged forward with every new commit, and neither process status
//! nor acknowledgement would move until the backlog shrank.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::lsn::{Lsn, Position};

/// How many commits (and items per entity) may wait before neighbours are merged.
pub(super) const MAX_PENDING: usize = 4096;

/// The operators (by index) that listen to an entity.
pub(super) type Listeners = Arc<[usize]>;

/// An entity's process status as one commit leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Item {
    /// The process-status timestamp: the newest of the commit's events of the entity.
    pub timestamp: i64,
    /// The position of the commit's last event of the entity.
    pub position: Position,
}

impl Item {
    /// Takes in a later commit's item: the newest timestamp, the later position.
    pub fn merge(&mut self, newer: Item) {
        self.timestamp = self.timestamp.max(newer.timestamp);
        self.position = self.position.max(newer.position);
    }
}

/// One commit, as the dispatcher hands it to the coordinator.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub end_lsn: Lsn,
    /// Per entity: its item, and the operators that listen to it.
    pub items: foldhash::HashMap<Arc<str>, (Item, Listeners)>,
}

#[derive(Debug)]
struct EntityQueue {
    listeners: Listeners,
    /// `(end_lsn of the commit, item)`, in WAL order.
    items: VecDeque<(Lsn, Item)>,
}

/// What is ready: items to store (at most one per entity), then the position to acknowledge.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Ready {
    pub items: Vec<(Arc<str>, Item)>,
    pub ack: Option<Lsn>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.ack.is_none()
    }
}

/// Commits and items waiting for the operators.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    commits: VecDeque<Lsn>,
    entities: HashMap<Arc<str>, EntityQueue>,
}

impl Waiting {
    /// Queues a commit.
    pub fn push(&mut self, pending: Pending) {
        self.commits.push_back(pending.end_lsn);
        if self.commits.len() > MAX_PENDING {
            // Of each two neighbours, the newer end covers the older one.
            let mut newer_of_each = self.commits.len() % 2 == 1;
            self.commits.retain(|_| {
                newer_of_each = !newer_of_each;
                newer_of_each
            });
        }
        for (entity, (item, listeners)) in pending.items {
            let queue = self.entities.entry(entity).or_insert_with(|| EntityQueue {
                listeners,
                items: VecDeque::new(),
            });
            queue.items.push_back((pending.end_lsn, item));
            if queue.items.len() > MAX_PENDING {
                queue.items = merge_neighbours(std::mem::take(&mut queue.items));
            }
        }
    }

    /// Takes what is ready. `done(i)` is how far operator `i` is done (the end LSN of the last
    /// commit it has finished); `all_done` the least of them, read **before** any `done(i)`,
    /// so that it is never ahead of them.
    pub fn take_ready(&mut self, all_done: Lsn, done: impl Fn(usize) -> Lsn) -> Ready {
        let mut ready = Ready::default();
        for (entity, queue) in &mut self.entities {
            let through = queue
                .listeners
                .iter()
                .map(|&i| done(i))
                .min()
                .unwrap_or(Lsn(u64::MAX))
                .max(all_done);
            let mut taken: Option<Item> = None;
            while let Some(&(end, item)) = queue.items.front() {
                if end > through {
                    break;
                }
                queue.items.pop_front();
                match taken.as_mut() {
                    Some(t) => t.merge(item),
                    None => taken = Some(item),
                }
            }
            if let Some(item) = taken {
                ready.items.push((entity.clone(), item));
            }
        }
        while self.commits.front().is_some_and(|&end| end <= all_done) {
            ready.ack = self.commits.pop_front();
        }
        ready
    }

    /// Whether nothing waits.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.commits.is_empty() && self.entities.values().all(|q| q.items.is_empty())
    }
}

/// Each two neighbours of `items` as one entry at the newer one's end; with an odd number,
/// the newest stays alone (it is the one that moves on).
fn merge_neighbours(items: VecDeque<(Lsn, Item)>) -> VecDeque<(Lsn, Item)> {
    let mut merged = VecDeque::with_capacity(items.len() / 2 + 1);
    let mut items = items.into_iter();
    while let Some((end, item)) = items.next() {
        match items.next() {
            Some((newer_end, newer)) => {
                let mut both = item;
                both.merge(newer);
                merged.push_back((newer_end, both));
            }
            None => merged.push_back((end, item)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(timestamp: i64, lsn: u64) -> Item {
        Item {
            timestamp,
            position: Position::new(Lsn(lsn), 0),
        }
    }

    fn pending(end: u64, items: &[(&str, Item, &[usize])]) -> Pending {
        Pending {
            end_lsn: Lsn(end),
            items: items
                .iter()
                .map(|(e, i, l)| (Arc::from(*e), (*i, Listeners::from(*l))))
                .collect(),
        }
    }

    fn sorted(mut ready: Ready) -> Ready {
        ready.items.sort_by(|a, b| a.0.cmp(&b.0));
        ready
    }

    /// Operator 0 listens to comments, operator 1 to posts. Operator 0 halts: posts' process
    /// status goes on, comments' does not, and nothing is acknowledged past operator 0.
    #[test]
    fn an_entity_waits_only_for_the_operators_that_listen_to_it() {
        let mut waiting = Waiting::default();
        waiting.push(pending(
            10,
            &[("comments", item(1, 8), &[0]), ("posts", item(2, 9), &[1])],
        ));
        waiting.push(pending(20, &[("posts", item(3, 19), &[1])]));
        waiting.push(pending(30, &[("tags", item(4, 29), &[])]));
        let done = [Lsn(0), Lsn(30)];
        let ready = sorted(waiting.take_ready(Lsn(0), |i| done[i]));
        assert_eq!(
            ready,
            Ready {
                items: vec![
                    (Arc::from("posts"), item(3, 19)),
                    (Arc::from("tags"), item(4, 29))
                ],
                ack: None,
            }
        );
        assert!(waiting.take_ready(Lsn(0), |i| done[i]).is_empty());
        // Operator 0 catches up to 20: comments is stored, and 20 is acknowledged.
        let done = [Lsn(20), Lsn(30)];
        let ready = sorted(waiting.take_ready(Lsn(20), |i| done[i]));
        assert_eq!(
            ready,
            Ready {
                items: vec![(Arc::from("comments"), item(1, 8))],
                ack: Some(Lsn(20)),
            }
        );
        let ready = waiting.take_ready(Lsn(30), |_| Lsn(30));
        assert_eq!(ready.ack, Some(Lsn(30)));
        assert!(waiting.is_empty());
    }

    /// A commit the operators are done with before the coordinator has received it is
    /// acknowledged only once it has been received (and its items stored).
    #[test]
    fn only_received_commits_are_acknowledged() {
        let mut waiting = Waiting::default();
        waiting.push(pending(10, &[]));
        assert_eq!(waiting.take_ready(Lsn(50), |_| Lsn(50)).ack, Some(Lsn(10)));
        assert_eq!(waiting.take_ready(Lsn(50), |_| Lsn(50)).ack, None);
    }

    #[test]
    fn long_queues_merge_neighbours_and_stay_ready_near_the_operators() {
        let mut waiting = Waiting::default();
        let pushed = MAX_PENDING as u64 + 10;
        for n in 1..=pushed {
            waiting.push(pending(
                n * 10,
                &[("posts", item(n as i64, n * 10 - 1), &[0])],
            ));
        }
        assert!(waiting.commits.len() <= MAX_PENDING);
        assert!(waiting.entities[&Arc::from("posts")].items.len() <= MAX_PENDING);
        // The first commit was merged with the second: nothing before the second's end.
        let ready = waiting.take_ready(Lsn(15), |_| Lsn(15));
        assert_eq!(ready, Ready::default());
        let ready = waiting.take_ready(Lsn(20), |_| Lsn(20));
        assert_eq!(ready.items, vec![(Arc::from("posts"), item(2, 19))]);
        assert_eq!(ready.ack, Some(Lsn(20)));

        // Operators stay far behind while commits keep coming: what they are done with is
        // still stored and acknowledged as they go, a few commits at a time.
        let mut done = 20;
        for n in pushed + 1..=pushed + 20_000 {
            waiting.push(pending(
                n * 10,
                &[("posts", item(n as i64, n * 10 - 1), &[0])],
            ));
            if n % 100 == 0 {
                done += 1000; // operators move 100 commits, the reader too
                let ready = waiting.take_ready(Lsn(done), |_| Lsn(done));
                let acked = ready.ack.expect("an acknowledgement as the operators move");
                assert!(
                    acked.0 <= done && acked.0 + 100 >= done,
                    "acked {acked:?}, done {done}"
                );
                let (_, stored) = ready.items[0];
                assert!(stored.position.commit_lsn.0 < done);
            }
        }
        // Everything comes out in the end, the newest exactly.
        let end = (pushed + 20_000) * 10;
        let ready = waiting.take_ready(Lsn(end), |_| Lsn(end));
        assert_eq!(ready.ack, Some(Lsn(end)));
        assert_eq!(
            ready.items,
            vec![(Arc::from("posts"), item((pushed + 20_000) as i64, end - 1))]
        );
        assert!(waiting.is_empty());
    }

    #[test]
    fn merged_items_keep_the_newest_of_each() {
        let mut a = Item {
            timestamp: 5,
            position: Position::new(Lsn(8), 0),
        };
        a.merge(Item {
            timestamp: 3,
            position: Position::new(Lsn(18), 2),
        });
        assert_eq!(
            a,
            Item {
                timestamp: 5,
                position: Position::new(Lsn(18), 2),
            }
        );
    }
}
