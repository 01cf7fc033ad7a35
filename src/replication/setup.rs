//! Checks and creates what streaming needs: `wal_level = logical`, a role that may replicate,
//! the publication (first) and the logical slot (second).
//!
//! Everything here runs over an ordinary SQL connection and is safe to run again: what
//! exists is checked and kept.

use sqlx::PgPool;

use super::version::{OLDEST_SUPPORTED_MAJOR, ServerVersion};
use crate::lsn::Lsn;

/// Which tables a publication covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicationTables {
    /// `FOR ALL TABLES` (needs a superuser to create).
    All,
    /// `FOR TABLE ...`, each `(schema, table)`.
    Tables(Vec<(String, String)>),
}

/// A definite problem with the server, the role or the slot, with the fix in its message;
/// or a failed query.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "the server runs PostgreSQL {version}; streamex needs PostgreSQL {OLDEST_SUPPORTED_MAJOR} \
         or later (for publish_via_partition_root and pg_replication_slots.wal_status): upgrade \
         the server, or set database_url to a server of version {OLDEST_SUPPORTED_MAJOR} or later"
    )]
    UnsupportedVersion { version: String },
    #[error(
        "wal_level is '{current}'; logical replication needs 'logical': set wal_level = logical in \
         postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart the server"
    )]
    WalLevel { current: String },
    #[error(
        "role {role:?} lacks the REPLICATION attribute, which a replication slot needs: run \
         ALTER ROLE \"{role}\" REPLICATION as a superuser"
    )]
    NotReplicationRole { role: String },
    #[error(
        "table {schema}.{table}, listed in the publication's tables, does not exist in database \
         {database:?}: create it, or remove it from the configuration"
    )]
    TableMissing {
        schema: String,
        table: String,
        database: String,
    },
    #[error(
        "replication slot {slot:?} uses the output plugin {plugin:?}; streamex needs pgoutput: \
         choose another slot name, or drop this slot with SELECT pg_drop_replication_slot('{slot}')"
    )]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} belongs to database {slot_database:?}, not {database:?}: \
         choose another slot name"
    )]
    OtherDatabase {
        slot: String,
        slot_database: String,
        database: String,
    },
    #[error(
        "replication slot {slot:?} was invalidated: the WAL it still needed was removed (it fell \
         more than max_slot_wal_keep_size behind), so the changes made since {confirmed} can no \
         longer be read through it. Drop it with SELECT pg_drop_replication_slot('{slot}') and run \
         `streamex setup` to create a new one (or set replication.recreate_invalidated_slot = true), \
         then rebuild what is derived from the changes in between"
    )]
    SlotInvalidated { slot: String, confirmed: String },
    #[error(
        "publication {publication:?} publishes {has}, but the configuration asks for {wanted}; \
         streamex does not drop a publication (a slot reading it would break). Name a new \
         publication in `publication` (and a new `slot`, since a slot reads one publication's \
         history), or recreate this one by hand with DROP PUBLICATION and `streamex setup`, then \
         drop and recreate the slot"
    )]
    PublicationScope {
        publication: String,
        wanted: String,
        has: String,
    },
    #[error(
        "publication {publication:?} does not exist in database {database:?} (was it dropped?). \
         The slot decodes old WAL with the catalog of its time, so recreating the publication \
         does not repair it: run `streamex setup` to create the publication again, drop the slot \
         (SELECT pg_drop_replication_slot('{slot}')) and run `streamex setup` once more to create \
         a new one. Changes made between the drop and the new slot are not seen: rebuild what is \
         derived from them"
    )]
    PublicationMissing {
        publication: String,
        slot: String,
        database: String,
    },
    #[error(
        "replication slot {slot:?} does not exist in database {database:?}: it was dropped, or \
         lost in a failover to a standby that had no copy of it (before PostgreSQL 17, or a \
         slot that is not a failover slot synchronized to that standby). The changes after its \
         last acknowledged position cannot be read again. A new slot would start from now: \
         `streamex setup` makes one only where no operator has a checkpoint on the old one; \
         to accept the loss set replication.recreate_invalidated_slot = true, then rebuild \
         each derived table (`streamex rebuild OPERATOR`)"
    )]
    SlotMissing { slot: String, database: String },
    #[error("{context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: sqlx::Error,
    },
}

impl SetupError {
    /// Whether trying again later may help (a lost connection), as opposed to a state that
    /// needs a person to fix it.
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Sql { source, .. } => crate::error::is_transient_sqlx(source),
            _ => false,
        }
    }
}

fn sql(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SetupError {
    let context = context.into();
    move |source| SetupError::Sql { context, source }
}

/// `name` quoted as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` quoted as an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Checks that the server can do logical replication for the connected role: a supported
/// version, `wal_level = logical`, a role that may replicate.
pub async fn check_server(pool: &PgPool) -> Result<(), SetupError> {
    server_version(pool).await?;
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(sql("reading wal_level"))?;
    if level != "logical" {
        return Err(SetupError::WalLevel { current: level });
    }
    let (role, allowed): (String, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .map_err(sql("reading the role's attributes"))?;
    if !allowed {
        return Err(SetupError::NotReplicationRole { role });
    }
    Ok(())
}

/// The server's version (`server_version_num`); an unsupported one is an error that says so.
pub async fn server_version(pool: &PgPool) -> Result<ServerVersion, SetupError> {
    let num: String = sqlx::query_scalar("SELECT current_setting('server_version_num')")
        .fetch_one(pool)
        .await
        .map_err(sql("reading server_version_num"))?;
    let version = ServerVersion::parse_num(&num).ok_or_else(|| SetupError::UnsupportedVersion {
        version: format!("{num:?} (server_version_num, not a number)"),
    })?;
    supported(version)?;
    Ok(version)
}

/// `version` if streamex supports it, else [`SetupError::UnsupportedVersion`].
pub fn supported(version: ServerVersion) -> Result<ServerVersion, SetupError> {
    if version.is_supported() {
        Ok(version)
    } else {
        Err(SetupError::UnsupportedVersion {
            version: version.to_string(),
        })
    }
}

async fn database(pool: &PgPool) -> Result<String, SetupError> {
    sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .map_err(sql("reading the database name"))
}

/// What [`ensure_publication`] did to bring the publication in line with the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicationSync {
    /// It did not exist and was created.
    pub created: bool,
    /// Tables added to it, as `schema.table`.
    pub added: Vec<String>,
    /// Tables removed from it, as `schema.table`.
    pub removed: Vec<String>,
    /// Its options were changed to what streamex needs (every change published, partitions
    /// as their root).
    pub options_changed: bool,
}

impl PublicationSync {
    /// Whether anything was changed.
    pub fn changed(&self) -> bool {
        self.created || !self.added.is_empty() || !self.removed.is_empty() || self.options_changed
    }
}

/// The options every streamex publication has: every kind of change, and the changes of a
/// partition published as changes of its partitioned (root) table, so that an operator on
/// `measurements` sees the rows of `measurements_2024` (and of partitions attached later).
/// From PostgreSQL 18 on, stored generated columns too: there a table whose replica identity
/// holds a generated column the publication leaves out (REPLICA IDENTITY FULL) refuses
/// updates and deletes (SQLSTATE 42P10), and events carry the columns' values.
fn publication_options(version: ServerVersion) -> String {
    let mut options =
        "publish = 'insert, update, delete, truncate', publish_via_partition_root = true"
            .to_owned();
    if version.publishes_generated_columns() {
        options.push_str(", publish_generated_columns = stored");
    }
    options
}

/// `schema.table` for messages.
fn qualified((schema, table): &(String, String)) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Creates the publication when it is missing, and otherwise brings it in line with
/// `tables`: exactly the configured tables (`ALTER PUBLICATION ... SET TABLE`), every kind of
/// change, partitions published as their root. Each change is logged.
///
/// A publication `FOR ALL TABLES` cannot become one of some tables (or the other way round)
/// without being dropped, and dropping a publication a slot reads breaks that slot: that case
/// is refused with [`SetupError::PublicationScope`], which says what to do.
pub async fn ensure_publication(
    pool: &PgPool,
    name: &str,
    tables: &PublicationTables,
) -> Result<PublicationSync, SetupError> {
    if let PublicationTables::Tables(list) = tables {
        for (schema, table) in list {
            let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(format!("{}.{}", quote_ident(schema), quote_ident(table)))
                .fetch_one(pool)
                .await
                .map_err(sql("looking up a published table"))?;
            if found.is_none() {
                return Err(SetupError::TableMissing {
                    schema: schema.clone(),
                    table: table.clone(),
                    database: database(pool).await?,
                });
            }
        }
    }
    let version = server_version(pool).await?;
    let options = publication_options(version);
    let mut sync = PublicationSync::default();
    if !publication_exists(pool, name).await? {
        let target = match tables {
            PublicationTables::All => "ALL TABLES".to_owned(),
            PublicationTables::Tables(list) => {
                let names: Vec<String> = list.iter().map(qualified).collect();
                format!("TABLE {}", names.join(", "))
            }
        };
        let statement = format!(
            "CREATE PUBLICATION {} FOR {target} WITH ({options})",
            quote_ident(name)
        );
        match sqlx::query(&statement).execute(pool).await {
            Ok(_) => {
                tracing::info!(publication = name, tables = %target, "created publication");
                sync.created = true;
                return Ok(sync);
            }
            // Another process created it at the same moment (42710, or 23505 when both
            // inserted into pg_publication at once): bring that one in line below.
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("42710" | "23505")) => {}
            Err(e) => {
                return Err(sql(format!(
                    "creating publication {name:?} (needs CREATE on the database and ownership of \
                     the tables, or a superuser for FOR ALL TABLES)"
                ))(e));
            }
        }
    }
    // pubgencols exists from PostgreSQL 18 on.
    let generated = if version.publishes_generated_columns() {
        "pubgencols = 's'"
    } else {
        "true"
    };
    let (all_tables, via_root, publishes_all): (bool, bool, bool) = sqlx::query_as(&format!(
        "SELECT puballtables, pubviaroot,
                pubinsert AND pubupdate AND pubdelete AND pubtruncate AND {generated}
           FROM pg_publication WHERE pubname = $1"
    ))
    .bind(name)
    .fetch_one(pool)
    .await
    .map_err(sql("reading the publication"))?;
    let alter = |what: String| format!("ALTER PUBLICATION {} {what}", quote_ident(name));
    match tables {
        PublicationTables::All if !all_tables => {
            return Err(SetupError::PublicationScope {
                publication: name.to_owned(),
                wanted: "every table (no `tables` in the configuration)".to_owned(),
                has: "a list of tables".to_owned(),
            });
        }
        PublicationTables::Tables(_) if all_tables => {
            return Err(SetupError::PublicationScope {
                publication: name.to_owned(),
                wanted: "the tables listed in `tables`".to_owned(),
                has: "FOR ALL TABLES".to_owned(),
            });
        }
        PublicationTables::All => {}
        PublicationTables::Tables(list) => {
            let current: Vec<(String, String)> = sqlx::query_as(
                "SELECT n.nspname::text, c.relname::text
                   FROM pg_publication_rel r
                   JOIN pg_publication p ON p.oid = r.prpubid
                   JOIN pg_class c ON c.oid = r.prrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE p.pubname = $1",
            )
            .bind(name)
            .fetch_all(pool)
            .await
            .map_err(sql("reading the publication's tables"))?;
            // Publications of whole schemas (FOR TABLES IN SCHEMA, PostgreSQL 15+) are replaced
            // by the list too. Before 15 there is no catalog of them to ask (a query naming it
            // fails to parse, whatever CASE surrounds it).
            let schemas: i64 = if version.publication_schemas() {
                sqlx::query_scalar(
                    "SELECT count(*) FROM pg_publication_namespace pn
                       JOIN pg_publication p ON p.oid = pn.pnpubid WHERE p.pubname = $1",
                )
                .bind(name)
                .fetch_one(pool)
                .await
                .map_err(sql("reading the publication's schemas"))?
            } else {
                0
            };
            let want: std::collections::BTreeSet<&(String, String)> = list.iter().collect();
            let have: std::collections::BTreeSet<&(String, String)> = current.iter().collect();
            sync.added = want.difference(&have).map(|t| qualified(t)).collect();
            sync.removed = have.difference(&want).map(|t| qualified(t)).collect();
            if !sync.added.is_empty() || !sync.removed.is_empty() || schemas > 0 {
                let names: Vec<String> = list.iter().map(qualified).collect();
                sqlx::query(&alter(format!("SET TABLE {}", names.join(", "))))
                    .execute(pool)
                    .await
                    .map_err(sql(format!(
                        "changing the tables of publication {name:?} to the configured ones (needs \
                         ownership of the publication and of the tables)"
                    )))?;
                tracing::warn!(
                    publication = name,
                    added = %sync.added.join(", "),
                    removed = %sync.removed.join(", "),
                    "publication changed to publish exactly the configured tables: changes to an \
                     added table are streamed from now on, not before"
                );
            }
        }
    }
    if !via_root || !publishes_all {
        sqlx::query(&alter(format!("SET ({options})")))
            .execute(pool)
            .await
            .map_err(sql(format!(
                "setting the options of publication {name:?} (needs ownership of the publication)"
            )))?;
        tracing::warn!(
            publication = name,
            options = %options,
            "publication options changed: every kind of change is published, partitions as \
             their partitioned table (and from PostgreSQL 18 stored generated columns)"
        );
        sync.options_changed = true;
    }
    Ok(sync)
}

/// The published tables a set of entity names leaves out: every `(schema, table)` of
/// `wanted` that publication `name` does not publish (a partition counts as its root).
pub async fn unpublished(
    pool: &PgPool,
    name: &str,
    wanted: &[(String, String)],
) -> Result<Vec<(String, String)>, SetupError> {
    let published: Vec<(String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(sql("reading the publication's tables"))?;
    Ok(wanted
        .iter()
        .filter(|t| !published.contains(t))
        .cloned()
        .collect())
}

/// What a published table lacks so that PostgreSQL can publish its updates and deletes.
const NO_KEY_DEFAULT: &str = "no primary key and REPLICA IDENTITY DEFAULT: updates and deletes \
     will be refused; no <entity>/<id> channel (add a primary key, or ALTER TABLE ... REPLICA \
     IDENTITY FULL or USING INDEX)";
const IDENTITY_NOTHING: &str = "REPLICA IDENTITY NOTHING: updates and deletes will be refused; \
     no <entity>/<id> channel (ALTER TABLE ... REPLICA IDENTITY DEFAULT with a primary key, FULL \
     or USING INDEX)";
const VIRTUAL_GENERATED_FULL: &str = "REPLICA IDENTITY FULL with a virtual generated column \
     (PostgreSQL 18), which no publication can publish: updates and deletes will be refused (make \
     the column STORED, or give the table a primary key under REPLICA IDENTITY DEFAULT, or \
     USING INDEX)";

/// The published tables (for [`PublicationTables::All`]: every user table) whose updates and
/// deletes PostgreSQL refuses once they are in a publication that publishes them (SQLSTATE
/// 55000): those without a primary key under REPLICA IDENTITY DEFAULT, and those with REPLICA
/// IDENTITY NOTHING; and on PostgreSQL 18 (42P10) those under REPLICA IDENTITY FULL with a
/// virtual generated column. Each `(schema, table, what is missing)`, in name order; tables that do
/// not exist are left out.
pub async fn tables_without_identity(
    pool: &PgPool,
    tables: &PublicationTables,
) -> Result<Vec<(String, String, &'static str)>, SetupError> {
    const COLUMNS: &str = "SELECT n.nspname::text, c.relname::text, c.relreplident::text,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
               EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attgenerated = 'v' AND NOT a.attisdropped)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace";
    let rows: Vec<(String, String, String, bool, bool)> = match tables {
        PublicationTables::All => {
            // The tables FOR ALL TABLES publishes: ordinary and partitioned user tables.
            sqlx::query_as(&format!(
                "{COLUMNS} WHERE c.relkind IN ('r', 'p')
                   AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
                 ORDER BY 1, 2"
            ))
            .fetch_all(pool)
            .await
        }
        PublicationTables::Tables(list) => {
            let names: Vec<String> = list
                .iter()
                .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
                .collect();
            sqlx::query_as(&format!(
                "{COLUMNS} WHERE c.oid IN (SELECT to_regclass(name)::oid FROM unnest($1::text[]) name)
                 ORDER BY 1, 2"
            ))
            .bind(names)
            .fetch_all(pool)
            .await
        }
    }
    .map_err(sql("reading the published tables' replica identities"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(schema, table, identity, primary, virtual_generated)| {
            let missing = match identity.as_str() {
                "d" if !primary => NO_KEY_DEFAULT,
                "n" => IDENTITY_NOTHING,
                "f" if virtual_generated => VIRTUAL_GENERATED_FULL,
                _ => return None,
            };
            Some((schema, table, missing))
        })
        .collect())
}

/// Whether publication `name` exists in the connected database.
pub async fn publication_exists(pool: &PgPool, name: &str) -> Result<bool, SetupError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(sql("looking up the publication"))
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SlotInfo {
    pub name: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub temporary: bool,
    /// The backend streaming from it, if any.
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL the slot keeps from being removed (from its restart position).
    pub retained_bytes: Option<i64>,
    /// Bytes of WAL written after the slot's confirmed position: how far behind it is.
    pub lag_bytes: Option<i64>,
    /// Whether the slot is synchronized to standbys so that it survives a failover
    /// (PostgreSQL 17 and later; `None` before).
    pub failover: Option<bool>,
}

/// Reads slot `name`, if it exists.
pub async fn slot_info(pool: &PgPool, name: &str) -> Result<Option<SlotInfo>, SetupError> {
    let row: Option<SlotRow> = sqlx::query_as(
        "SELECT slot_name::text, plugin::text, database::text, temporary, active_pid,
                restart_lsn::text, confirmed_flush_lsn::text, wal_status,
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                -- A column from PostgreSQL 17 on: read through the row's JSON, NULL before.
                (to_jsonb(s) ->> 'failover')::bool
           FROM pg_replication_slots s WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(sql("reading pg_replication_slots"))?;
    Ok(row.map(|r| SlotInfo {
        name: r.0,
        plugin: r.1,
        database: r.2,
        temporary: r.3,
        active_pid: r.4,
        restart_lsn: r.5.and_then(|s| s.parse().ok()),
        confirmed_flush_lsn: r.6.and_then(|s| s.parse().ok()),
        wal_status: r.7,
        retained_bytes: r.8,
        lag_bytes: r.9,
        failover: r.10,
    }))
}

type SlotRow = (
    String,
    Option<String>,
    Option<String>,
    bool,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
);

/// Checks that slot `name` can be streamed from here: right plugin, this database, not
/// invalidated.
pub async fn check_slot(pool: &PgPool, slot: &SlotInfo) -> Result<(), SetupError> {
    if slot.plugin.as_deref() != Some("pgoutput") {
        return Err(SetupError::WrongPlugin {
            slot: slot.name.clone(),
            plugin: slot.plugin.clone().unwrap_or_else(|| "(physical)".into()),
        });
    }
    let database = database(pool).await?;
    if slot.database.as_deref() != Some(database.as_str()) {
        return Err(SetupError::OtherDatabase {
            slot: slot.name.clone(),
            slot_database: slot.database.clone().unwrap_or_default(),
            database,
        });
    }
    if slot.wal_status.as_deref() == Some("lost") {
        return Err(SetupError::SlotInvalidated {
            slot: slot.name.clone(),
            confirmed: slot
                .confirmed_flush_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "its last confirmed position".into()),
        });
    }
    Ok(())
}

/// Creates the logical slot `name` (pgoutput) when it is missing and checks it when not.
/// Returns the slot and whether it was created.
pub async fn ensure_slot(pool: &PgPool, name: &str) -> Result<(SlotInfo, bool), SetupError> {
    let mut created = false;
    if slot_info(pool, name).await?.is_none() {
        // From PostgreSQL 17 on, a failover slot: synchronized to standbys that ask for it
        // (`sync_replication_slots`), so that it survives the promotion of one.
        let failover = server_version(pool).await?.failover_slots();
        let create = if failover {
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
        } else {
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
        };
        let result = sqlx::query(create).bind(name).execute(pool).await;
        match result {
            Ok(_) => {
                created = true;
                tracing::info!(slot = name, failover, "created replication slot");
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(sql(format!("creating replication slot {name:?}"))(e)),
        }
    }
    let slot = slot_info(pool, name)
        .await?
        .ok_or_else(|| SetupError::SlotMissing {
            slot: name.to_owned(),
            database: String::new(),
        })?;
    check_slot(pool, &slot).await?;
    warn_about_failover(pool, &slot).await;
    Ok((slot, created))
}

/// What a failover of the server would do to the slot, when it would lose it or the standby
/// could get ahead of it: logged, not refused (a server without standbys needs none of it).
async fn warn_about_failover(pool: &PgPool, slot: &SlotInfo) {
    match slot.failover {
        None => {}
        Some(false) => tracing::info!(
            slot = %slot.name,
            "the slot is not a failover slot (it was made before streamex made failover slots, \
             or by hand): a promoted standby will not have it. Drop it while streamex is \
             stopped and let `streamex setup` make it again, or run ALTER_REPLICATION_SLOT \
             with FAILOVER true on a replication connection"
        ),
        Some(true) => {
            let standbys: Result<String, _> =
                sqlx::query_scalar("SELECT current_setting('synchronized_standby_slots')")
                    .fetch_one(pool)
                    .await;
            if standbys.is_ok_and(|s| s.trim().is_empty()) {
                tracing::info!(
                    slot = %slot.name,
                    "synchronized_standby_slots is empty on this server: streamex may be sent \
                     changes a standby has not received yet, and after that standby's \
                     promotion its copy of the slot would be behind what streamex acknowledged. \
                     Set it to the standbys' physical slots (see the README's failover notes)"
                );
            }
        }
    }
}

/// Drops slot `name` (it must not be in use).
pub async fn drop_slot(pool: &PgPool, name: &str) -> Result<(), SetupError> {
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(name)
        .execute(pool)
        .await
        .map_err(sql(format!("dropping replication slot {name:?}")))?;
    Ok(())
}

/// After the server ended streaming with SQLSTATE 42704 (undefined object): says which of
/// the publication and the slot is missing, by looking at the catalog.
pub async fn explain_missing(pool: &PgPool, slot: &str, publication: &str) -> Option<SetupError> {
    let database = database(pool).await.ok()?;
    if !publication_exists(pool, publication).await.ok()? {
        return Some(SetupError::PublicationMissing {
            publication: publication.to_owned(),
            slot: slot.to_owned(),
            database,
        });
    }
    match slot_info(pool, slot).await.ok()? {
        None => Some(SetupError::SlotMissing {
            slot: slot.to_owned(),
            database,
        }),
        Some(info) => check_slot(pool, &info).await.err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("Posts"), "\"Posts\"");
        assert_eq!(quote_ident("a\"b c"), "\"a\"\"b c\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn an_old_server_is_refused_with_the_versions_streamex_supports() {
        let error = supported(ServerVersion::from_num(120_022)).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("PostgreSQL 12.22") && message.contains("PostgreSQL 13 or later"),
            "{message}"
        );
        assert!(!error.is_transient());
        assert!(supported(ServerVersion::from_num(130_000)).is_ok());
    }
}
