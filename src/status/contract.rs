//! The [`ProcessStatusStorage`] contract as one test, for any backend.
//!
//! Each backend's tests call [`check`] on a storage of their own (it starts with
//! [`ProcessStatusStorage::reset`]); it panics, saying which rule broke, on the first violation.

use super::{ProcessStatusStorage, StatusItem};
use crate::lsn::Lsn;

async fn sorted<S: ProcessStatusStorage>(storage: &S) -> Vec<StatusItem> {
    let mut items = storage.load().await.expect("load");
    items.sort_by(|a, b| a.entity.cmp(&b.entity));
    items
}

/// Runs the contract against `storage`, which it resets first and leaves reset at the end.
///
/// # Panics
/// On the first rule the storage breaks, or on any error from it.
pub async fn check<S: ProcessStatusStorage>(storage: &S) {
    storage.reset().await.expect("reset");
    assert_eq!(sorted(storage).await, vec![], "load after reset");
    assert!(
        !storage.processed("posts", 0).await.expect("processed"),
        "an unknown entity is not processed"
    );

    // One item, then older values for each field in turn: each field keeps its maximum.
    storage
        .item_processed("posts", 1_000, Lsn(0x10))
        .await
        .expect("item_processed");
    assert_eq!(
        sorted(storage).await,
        vec![StatusItem::new("posts", 1_000, Lsn(0x10))],
        "first item"
    );
    storage
        .item_processed("posts", 500, Lsn(0x20))
        .await
        .expect("item_processed");
    assert_eq!(
        sorted(storage).await,
        vec![StatusItem::new("posts", 1_000, Lsn(0x20))],
        "an older timestamp must not move the timestamp backwards"
    );
    storage
        .item_processed("posts", 2_000, Lsn(0x05))
        .await
        .expect("item_processed");
    assert_eq!(
        sorted(storage).await,
        vec![StatusItem::new("posts", 2_000, Lsn(0x20))],
        "an older lsn must not move the lsn backwards"
    );
    storage
        .item_processed("posts", 2_000, Lsn(0x20))
        .await
        .expect("item_processed the same again");
    assert_eq!(
        sorted(storage).await,
        vec![StatusItem::new("posts", 2_000, Lsn(0x20))],
        "storing the same item again changes nothing"
    );

    // The processed() boundary: equal counts, one µs later does not.
    assert!(storage.processed("posts", 1_999).await.expect("processed"));
    assert!(
        storage.processed("posts", 2_000).await.expect("processed"),
        "an equal timestamp counts as processed"
    );
    assert!(
        !storage.processed("posts", 2_001).await.expect("processed"),
        "one µs later is not processed"
    );
    assert!(!storage.processed("comments", 0).await.expect("processed"));

    // A batch: new entities, an older item for an existing one, and one entity twice.
    storage
        .items_processed(&[
            StatusItem::new("comments", 10, Lsn(0x31)),
            StatusItem::new("posts", 1_500, Lsn(0x30)),
            StatusItem::new("comments", 30, Lsn(0x30)),
            StatusItem::new("schema.odd \"name\"", -5, Lsn(u64::MAX)),
        ])
        .await
        .expect("items_processed");
    assert_eq!(
        sorted(storage).await,
        vec![
            StatusItem::new("comments", 30, Lsn(0x31)),
            StatusItem::new("posts", 2_000, Lsn(0x30)),
            StatusItem::new("schema.odd \"name\"", -5, Lsn(u64::MAX)),
        ],
        "a batch keeps the maximum of each field, also for an entity listed twice"
    );
    storage.items_processed(&[]).await.expect("an empty batch");
    assert_eq!(
        sorted(storage).await.len(),
        3,
        "an empty batch changes nothing"
    );
    assert!(storage.processed("comments", 30).await.expect("processed"));
    assert!(!storage.processed("comments", 31).await.expect("processed"));
    assert!(
        storage
            .processed("schema.odd \"name\"", -5)
            .await
            .expect("processed")
    );

    storage.reset().await.expect("reset");
    assert_eq!(sorted(storage).await, vec![], "reset forgets everything");
    assert!(
        !storage
            .processed("posts", i64::MIN)
            .await
            .expect("processed"),
        "after reset nothing is processed"
    );
}
