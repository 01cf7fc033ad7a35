//! An exported snapshot tied to a position in the WAL: what a backfill reads the existing rows
//! under, so that it meets the stream at one well-defined point.
//!
//! `CREATE_REPLICATION_SLOT ... TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT` on a replication
//! connection returns the slot's consistent point `P` and the name of a snapshot that sees
//! exactly the transactions whose commit record comes before `P`: those a logical slot
//! starting at `P` would not send. Other sessions import it (`SET TRANSACTION SNAPSHOT`)
//! while the exporting connection stays open and idle; closing it drops the temporary slot.

use std::sync::atomic::{AtomicU64, Ordering};

use super::conn::{ConnectOptions, Connection};
use super::params::ConnectParams;
use super::setup::quote_ident;
use super::stream::SESSION_SETTINGS;
use super::{Lsn, ReplicationError};

/// A snapshot exported with a temporary slot, valid while this value lives.
#[derive(Debug)]
pub struct ExportedSnapshot {
    /// Kept open and idle: the snapshot is importable until it runs another command or closes.
    _conn: Connection,
    /// The name to give `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The consistent point: the snapshot holds every transaction committed before it, and
    /// none committed at or after it.
    pub point: Lsn,
}

impl ExportedSnapshot {
    /// Exports a snapshot through a temporary slot on a new replication connection (needs a
    /// free `max_replication_slots` and `max_wal_senders` entry while it lives).
    pub async fn create(params: &ConnectParams) -> Result<ExportedSnapshot, ReplicationError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let settings = SESSION_SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut conn = Connection::connect(
            params,
            &ConnectOptions {
                replication: true,
                settings,
            },
        )
        .await?;
        let slot = format!(
            "streamex_backfill_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let rows = conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(&slot)
            ))
            .await?;
        // slot_name, consistent_point, snapshot_name, output_plugin
        let row = rows.first();
        let point = row
            .and_then(|r| r.get_index(1))
            .and_then(|text| text.parse::<Lsn>().ok());
        let name = row.and_then(|r| r.get_index(2)).map(str::to_owned);
        match (point, name) {
            (Some(point), Some(name)) => Ok(ExportedSnapshot {
                _conn: conn,
                name,
                point,
            }),
            _ => Err(ReplicationError::Protocol(
                "CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT returned no consistent point or \
                 snapshot name"
                    .to_owned(),
            )),
        }
    }
}
