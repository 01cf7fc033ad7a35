//! The private cluster the other tests stand on.

use sqlx::Connection;
use streamex::testing::{self, Cluster, StopMode};

#[tokio::test]
async fn shared_server_has_logical_wal_and_separate_databases() -> anyhow::Result<()> {
    let a = testing::server().create_database().await?;
    let b = testing::server().create_database().await?;
    assert_ne!(a, b);
    let mut conn = sqlx::PgConnection::connect(&a).await?;
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(level, "logical");
    sqlx::query("CREATE TABLE only_here (id int)")
        .execute(&mut conn)
        .await?;
    let mut other = sqlx::PgConnection::connect(&b).await?;
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_here')::text")
        .fetch_one(&mut other)
        .await?;
    assert_eq!(found, None);
    Ok(())
}

#[tokio::test]
async fn private_cluster_restarts_and_is_removed_on_drop() -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .setting("max_replication_slots", "7")
        .start()?;
    let dir = cluster.data_dir();
    let url = cluster.url("postgres");
    cluster.restart(StopMode::Immediate)?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let slots: String = sqlx::query_scalar("SHOW max_replication_slots")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(slots, "7");
    drop(conn);
    assert!(dir.exists());
    drop(cluster);
    assert!(
        !dir.exists(),
        "cluster directory {} left behind",
        dir.display()
    );
    Ok(())
}
