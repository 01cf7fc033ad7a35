//! Process status kept in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{ProcessStatusStorage, StatusError, StatusItem};
use crate::lsn::Lsn;

/// Process status in this process's memory: lost on restart. Clones share the same map.
#[derive(Clone, Debug, Default)]
pub struct MemoryStatus {
    items: Arc<Mutex<HashMap<String, (i64, Lsn)>>>,
}

impl MemoryStatus {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (i64, Lsn)>> {
        // A panic while holding the lock cannot leave the map half-updated (every update is
        // one insert), so a poisoned lock is still good to use.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(map: &mut HashMap<String, (i64, Lsn)>, entity: &str, timestamp: i64, lsn: Lsn) {
        match map.get_mut(entity) {
            Some((t, l)) => {
                *t = (*t).max(timestamp);
                *l = (*l).max(lsn);
            }
            None => {
                map.insert(entity.to_owned(), (timestamp, lsn));
            }
        }
    }
}

impl ProcessStatusStorage for MemoryStatus {
    async fn item_processed(
        &self,
        entity: &str,
        timestamp: i64,
        lsn: Lsn,
    ) -> Result<(), StatusError> {
        Self::store(&mut self.lock(), entity, timestamp, lsn);
        Ok(())
    }

    async fn items_processed(&self, items: &[StatusItem]) -> Result<(), StatusError> {
        let mut map = self.lock();
        for item in items {
            Self::store(&mut map, &item.entity, item.timestamp, item.lsn);
        }
        Ok(())
    }

    async fn load(&self) -> Result<Vec<StatusItem>, StatusError> {
        Ok(self
            .lock()
            .iter()
            .map(|(entity, &(timestamp, lsn))| StatusItem::new(entity.clone(), timestamp, lsn))
            .collect())
    }

    async fn reset(&self) -> Result<(), StatusError> {
        self.lock().clear();
        Ok(())
    }

    async fn processed(&self, entity: &str, timestamp: i64) -> Result<bool, StatusError> {
        Ok(self
            .lock()
            .get(entity)
            .is_some_and(|&(stored, _)| stored >= timestamp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_contract() {
        crate::status::contract::check(&MemoryStatus::new()).await;
        crate::status::contract::check(&crate::status::StatusBackend::from(MemoryStatus::new()))
            .await;
    }

    #[tokio::test]
    async fn never_moves_backwards_on_either_field() {
        let s = MemoryStatus::new();
        s.item_processed("posts", 100, Lsn(50)).await.unwrap();
        s.item_processed("posts", 90, Lsn(60)).await.unwrap();
        s.item_processed("posts", 110, Lsn(40)).await.unwrap();
        assert_eq!(
            s.load().await.unwrap(),
            vec![StatusItem::new("posts", 110, Lsn(60))]
        );
    }

    #[tokio::test]
    async fn processed_boundary() {
        let s = MemoryStatus::new();
        assert!(!s.processed("posts", i64::MIN).await.unwrap());
        s.item_processed("posts", 1_700_000_000_123_456, Lsn(1))
            .await
            .unwrap();
        assert!(s.processed("posts", 1_700_000_000_123_455).await.unwrap());
        assert!(s.processed("posts", 1_700_000_000_123_456).await.unwrap());
        assert!(!s.processed("posts", 1_700_000_000_123_457).await.unwrap());
        assert!(!s.processed("comments", 0).await.unwrap());
    }

    #[tokio::test]
    async fn clones_share_and_reset_forgets() {
        let a = MemoryStatus::new();
        let b = a.clone();
        a.items_processed(&[
            StatusItem::new("posts", 1, Lsn(1)),
            StatusItem::new("posts", 3, Lsn(0)),
            StatusItem::new("users", 2, Lsn(2)),
        ])
        .await
        .unwrap();
        let mut items = b.load().await.unwrap();
        items.sort_by(|x, y| x.entity.cmp(&y.entity));
        assert_eq!(
            items,
            vec![
                StatusItem::new("posts", 3, Lsn(1)),
                StatusItem::new("users", 2, Lsn(2)),
            ]
        );
        b.reset().await.unwrap();
        assert!(a.load().await.unwrap().is_empty());
        assert!(!a.processed("posts", 0).await.unwrap());
    }
}
