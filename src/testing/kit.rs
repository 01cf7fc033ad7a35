//! A testing kit for operator authors: one operator, a private database, a list of SQL
//! statements, and the derived tables to assert on.
//!
//! ```text
//! OperatorTest::start(schema)
//!   ├─ a fresh database on the shared test server (private cluster, or STREAMEX_TEST_DATABASE_URL)
//!   ├─ the schema, and the kit's marker table streamex_testing.streamex_kit_marks
//!   └─ streamex setup (cli::prepare): the streamex schema, a publication of every table, the slot
//!
//! kit.run(operator, statements)
//!   ├─ each statement in its own transaction, in order
//!   ├─ a marker row, committed after them
//!   ├─ the service (cli::run_service, the code behind `streamex run`):
//!   │     slot ─► decoder ─► engine ─► operator ─► checkpoint ─► process status ─► ack
//!   ├─ wait until the marker's commit is processed: every operator is then done with every
//!   │  commit before it (the engine completes commits in WAL order)
//!   └─ stop cleanly: in-flight work finished, progress stored, the slot acknowledged
//! ```
//!
//! # Progress between runs
//!
//! The slot is created once, when the kit starts, so a later `run` continues from where the
//! previous one stopped: it sees exactly what was written since (through the kit or through
//! [`OperatorTest::pool`]), and each operator resumes after its checkpoint, as `streamex run`
//! does after a restart. Running a second, different operator later gives it every change
//! still ahead of the slot only: the slot never goes back.
//!
//! # Waiting
//!
//! A run waits until every operator is done through its marker's commit (the position the
//! slot is acknowledged to, [`PubSub::processed_through`]), never for a fixed time. While it waits
//! it checks `streamex.operator_state`: an operator that halts ends the run at once with its
//! last error. Retries are quick in the kit (10 ms doubling to 100 ms, 3 retries) so that a
//! failing operator halts in well under a second; see [`OperatorTest::retry`].

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgRow;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{ClusterError, server};
use crate::config::{Config, ConfigError, RetryConfig};
use crate::operator::{AnyOperator, Registry};
use crate::pubsub::PubSub;
use crate::replication::Lsn;
use crate::status::{self, OperatorRunState, PostgresStatus};

/// The kit's marker table (its schema is `streamex_testing`).
const MARKS: &str = "streamex_kit_marks";

/// How often a waiting run checks for halted operators and for a stopped service.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// What went wrong in an [`OperatorTest`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// The private cluster could not start, or the database could not be created.
    #[error("starting the test server or creating the test database")]
    Server(#[from] ClusterError),
    /// The test database refused the connection.
    #[error("connecting to the test database {url}")]
    Connect {
        /// The database's URL.
        url: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The schema given to [`OperatorTest::start`] failed.
    #[error("applying the schema given to OperatorTest::start")]
    Schema(#[source] sqlx::Error),
    /// Setting up streamex on the test database failed.
    #[error("setting up the test database (streamex schema, publication, slot)")]
    Setup(#[source] anyhow::Error),
    /// The configuration given to [`OperatorTest::with_config`] is not valid.
    #[error("the configuration given to OperatorTest::with_config")]
    Config(#[from] ConfigError),
    /// [`OperatorTest::run_configured`] names an operator the configuration lacks.
    #[error(
        "no operator named {name:?} in the configuration given to OperatorTest::with_config; \
         configured operators: {known}"
    )]
    UnknownOperator {
        /// The name asked for.
        name: String,
        /// The configured names.
        known: String,
    },
    /// A configured operator could not be built.
    #[error("building operator {name:?} from its configuration")]
    Build {
        /// The operator.
        name: String,
        /// Why.
        #[source]
        source: anyhow::Error,
    },
    /// One of a run's statements failed.
    #[error("statement {number} of {count} failed: {statement}")]
    Statement {
        /// 1-based.
        number: usize,
        /// How many statements the run had.
        count: usize,
        /// The statement.
        statement: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },
    /// An operator halted during the run.
    #[error("operator {operator:?} halted: {error}")]
    Halted {
        /// The operator.
        operator: String,
        /// Its last error.
        error: String,
    },
    /// The service stopped with an error.
    #[error("the service stopped with an error")]
    Service(#[source] anyhow::Error),
    /// The operators had not caught up within the kit's patience.
    #[error(
        "operators {operators} had not processed everything written after {waited:?}; \
         RUST_LOG=streamex=debug shows what they were doing"
    )]
    Timeout {
        /// The operators run.
        operators: String,
        /// How long the run waited.
        waited: Duration,
    },
    /// A query of the kit's own failed.
    #[error("{what}")]
    Database {
        /// What the kit was doing.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: anyhow::Error,
    },
    /// A query of the test's ([`OperatorTest::query_as`]) failed.
    #[error("query failed: {sql}")]
    Query {
        /// The query.
        sql: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },
}

/// A fresh database with a schema, in which operators are run through the real pipeline.
///
/// One kit per test: it owns its database, its publication and its slot (named after the
/// database, so unique across the shared cluster). Runs on one kit happen one at a time.
///
/// ```no_run
/// use streamex::operators::PostCommentTallies;
/// use streamex::testing::OperatorTest;
///
/// # async fn example() -> anyhow::Result<()> {
/// let kit = OperatorTest::start(include_str!("../../examples/blog/schema.sql")).await?;
/// kit.run(
///     PostCommentTallies,
///     &[
///         "INSERT INTO posts (id, title) VALUES (1, 'one')",
///         "INSERT INTO comments (post_id) VALUES (1), (1)",
///     ],
/// )
/// .await?;
/// let rows: Vec<(i64, i32)> = kit
///     .query_as("SELECT post_id, comments FROM post_comment_tallies")
///     .await?;
/// assert_eq!(rows, [(1, 2)]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct OperatorTest {
    url: String,
    pool: PgPool,
    config: Config,
    retry: Option<RetryConfig>,
    patience: Duration,
    registry: Registry,
    backfill: bool,
    running: Mutex<()>,
}

impl OperatorTest {
    /// Creates a fresh database on the shared test server ([`server`]), applies `schema`
    /// (any number of statements), and creates the publication (every table the schema
    /// created) and the slot.
    ///
    /// Tables created later are not published: create them in `schema`.
    pub async fn start(schema: &str) -> Result<OperatorTest, KitError> {
        let url = server().create_database().await?;
        let pool = PgPool::connect(&url)
            .await
            .map_err(|source| KitError::Connect {
                url: url.clone(),
                source,
            })?;
        sqlx::raw_sql(schema)
            .execute(&pool)
            .await
            .map_err(KitError::Schema)?;
        let setup = async {
            sqlx::raw_sql(&format!(
                "CREATE SCHEMA streamex_testing;
                 CREATE TABLE streamex_testing.{MARKS} (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
                 COMMENT ON TABLE streamex_testing.{MARKS} IS
                   'Written by streamex::testing::OperatorTest after the statements of a run: once it is processed, so is everything before it.';"
            ))
            .execute(&pool)
            .await?;
            // Every table but streamex's own: publishing those would feed the service's
            // writes back to it.
            let tables: Vec<(String, String)> = sqlx::query_as(
                "SELECT n.nspname::text, c.relname::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                    AND n.nspname NOT IN ('streamex', 'pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg\\_%'
                  ORDER BY 1",
            )
            .fetch_all(&pool)
            .await?;
            let database = url.rsplit('/').next().unwrap_or("streamex");
            let mut config = Config::parse(
                &format!("database_url = {url:?}\nslot = {database:?}"),
                "the testing kit's configuration",
                [],
            )?;
            config.tables = tables
                .iter()
                .map(|(schema, table)| {
                    crate::event::entity_name(schema, table, &config.default_schema)
                })
                .collect();
            tune(&mut config);
            crate::service::prepare(&config, &pool).await?;
            anyhow::Ok(config)
        };
        let config = setup.await.map_err(KitError::Setup)?;
        Ok(OperatorTest {
            url,
            pool,
            config,
            retry: None,
            patience: Duration::from_secs(60),
            registry: crate::operators::registry(),
            backfill: false,
            running: Mutex::new(()),
        })
    }

    /// Whether an operator's first run starts with a backfill of the rows that exist (see
    /// [`Operator::backfill`](crate::operator::Operator::backfill)). Off by default: a run
    /// hands the operator the statements' changes as events, which is what a test of its
    /// reactions wants; with it on, the first run reads the tables as they are after the
    /// statements instead (as `read` events), and later runs get the changes.
    pub fn backfill(mut self, on: bool) -> Self {
        self.backfill = on;
        self
    }

    /// Takes from configuration `toml` (the text of a `streamex.toml`) its `[[operators]]`,
    /// for [`run_configured`](Self::run_configured), and what shapes how they run:
    /// `[retry]`'s `on_failure`, `[entities]`, `[process_status] timestamp_field` and
    /// `[replication] batch_size`. The database, slot, publication and tables stay the kit's
    /// (`database_url` may be left out).
    pub fn with_config(mut self, toml: &str) -> Result<OperatorTest, KitError> {
        // The database is the kit's: a configuration without `database_url` is complete.
        let database = [("STREAMEX_DATABASE_URL".to_owned(), self.url.clone())];
        let given = Config::parse(toml, "the configuration given to OperatorTest", database)?;
        self.config.operators = given.operators;
        self.config.entities = given.entities;
        self.config.retry.on_failure = given.retry.on_failure;
        self.config.process_status.timestamp_field = given.process_status.timestamp_field;
        self.config.replication.batch_size = given.replication.batch_size;
        Ok(self)
    }

    /// The Rust operators [`run_configured`](Self::run_configured) may name (by default those
    /// that ship with streamex, [`crate::operators::registry`]).
    pub fn with_registry(mut self, registry: Registry) -> OperatorTest {
        self.registry = registry;
        self
    }

    /// The retry policy of every operator the kit runs, in place of the kit's quick one
    /// and of the configuration's.
    pub fn retry(mut self, retry: RetryConfig) -> OperatorTest {
        self.retry = Some(retry);
        self
    }

    /// How long a run waits for its operators before it fails (60 s by default): a guard
    /// against a test hanging, not a measure of speed.
    pub fn patience(mut self, patience: Duration) -> OperatorTest {
        self.patience = patience;
        self
    }

    /// The test database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool on the test database, for queries of your own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The replication slot (and the database's name).
    pub fn slot(&self) -> &str {
        &self.config.slot
    }

    /// Executes `statements` in order, each in its own transaction, without running any
    /// operator: the next run processes them. An error names the statement.
    pub async fn execute(&self, statements: &[&str]) -> Result<(), KitError> {
        for (index, statement) in statements.iter().enumerate() {
            sqlx::raw_sql(statement)
                .execute(&self.pool)
                .await
                .map_err(|source| KitError::Statement {
                    number: index + 1,
                    count: statements.len(),
                    statement: (*statement).to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Executes `statements` (as [`execute`](Self::execute)), then runs `operator` through
    /// the whole pipeline until it has processed everything written so far, and stops it.
    ///
    /// Fails when a statement fails, when the operator halts (with its last error), when the
    /// service stops with an error, or after the kit's patience.
    pub async fn run(
        &self,
        operator: impl Into<AnyOperator>,
        statements: &[&str],
    ) -> Result<(), KitError> {
        self.run_all(vec![operator.into()], statements).await
    }

    /// As [`run`](Self::run), for the operator configured under `name` in the configuration
    /// given to [`with_config`](Self::with_config): a declarative one, or a Rust one from
    /// the registry ([`with_registry`](Self::with_registry)).
    pub async fn run_configured(&self, name: &str, statements: &[&str]) -> Result<(), KitError> {
        let Some(entry) = self.config.operators.iter().find(|o| o.name == name) else {
            let known: Vec<&str> = self
                .config
                .operators
                .iter()
                .map(|o| o.name.as_str())
                .collect();
            return Err(KitError::UnknownOperator {
                name: name.to_owned(),
                known: if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
            });
        };
        let operators = self
            .registry
            .build(std::slice::from_ref(entry))
            .map_err(|source| KitError::Build {
                name: name.to_owned(),
                source: source.into(),
            })?;
        self.run_all(operators, statements).await
    }

    /// As [`run`](Self::run), for several operators at once.
    pub async fn run_all(
        &self,
        operators: Vec<AnyOperator>,
        statements: &[&str],
    ) -> Result<(), KitError> {
        let _one_at_a_time = self.running.lock().await;
        self.execute(statements).await?;
        let before_mark = self.mark().await?;

        let names: Vec<String> = operators.iter().map(|o| o.name().to_owned()).collect();
        let config = self.run_config();
        let pubsub = PubSub::new();
        let mut through = pubsub.processed_through();
        let stop = CancellationToken::new();
        let service = crate::Service::builder()
            .config(config)
            .configured_operators(false)
            .backfill(self.backfill)
            .operators(operators)
            .pubsub(pubsub)
            .status(PostgresStatus::new(self.pool.clone()))
            .build()
            .await
            .map_err(|e| KitError::Service(e.into()))?;
        let mut service = tokio::spawn({
            let stop = stop.clone();
            async move { service.run_until(stop).await.map_err(anyhow::Error::from) }
        });

        let deadline = tokio::time::Instant::now() + self.patience;
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome: Result<(), KitError> = loop {
            tokio::select! {
                // Every operator is done through a commit after `before_mark`: the marker's.
                changed = through.wait_for(|&end| end > before_mark) => match changed {
                    Ok(_) => break Ok(()),
                    Err(_) => std::future::pending().await,
                },
                result = &mut service => {
                    // It stops only on error (or a panic) before being asked to.
                    return Err(KitError::Service(match result {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => anyhow::anyhow!("the service stopped before it was asked to"),
                        Err(e) => anyhow::Error::new(e).context("the service panicked"),
                    }));
                }
                _ = check.tick() => {
                    if let Some(halted) = self.halted(&names).await? {
                        break Err(halted);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break Err(KitError::Timeout {
                            operators: names.join(", "),
                            waited: self.patience,
                        });
                    }
                }
            }
        };
        stop.cancel();
        let stopped = match tokio::time::timeout(self.patience, service).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(KitError::Service(e)),
            Ok(Err(e)) => Err(KitError::Service(
                anyhow::Error::new(e).context("the service panicked"),
            )),
            Err(_) => Err(KitError::Service(anyhow::anyhow!(
                "the service did not stop within {:?} of being asked to",
                self.patience
            ))),
        };
        outcome.and(stopped)
    }

    /// Sets a halted operator running again (as `streamex resume`): the next run gives it
    /// the events it has not processed, from its checkpoint on.
    pub async fn resume(&self, operator: &str) -> Result<(), KitError> {
        status::set_operator_running(&self.pool, &self.config.slot, operator)
            .await
            .map_err(|e| database("marking the operator running", e))
    }

    /// `operator`'s checkpoint: the `(commit_lsn, ordinal)` of the last event it durably
    /// processed, if any.
    pub async fn checkpoint(
        &self,
        operator: &str,
    ) -> Result<Option<crate::lsn::Position>, KitError> {
        let checkpoints = status::load_checkpoints(&self.pool, &self.config.slot)
            .await
            .map_err(|e| database("loading the operators' checkpoints", e))?;
        Ok(checkpoints.get(operator).copied())
    }

    /// The rows of `sql`, as tuples or any [`sqlx::FromRow`] type.
    pub async fn query_as<T>(&self, sql: &str) -> Result<Vec<T>, KitError>
    where
        T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        sqlx::query_as(sql)
            .fetch_all(&self.pool)
            .await
            .map_err(|source| KitError::Query {
                sql: sql.to_owned(),
                source,
            })
    }

    /// The first column of each row of `sql`.
    pub async fn query_scalar<T>(&self, sql: &str) -> Result<Vec<T>, KitError>
    where
        T: sqlx::Type<sqlx::Postgres> + for<'r> sqlx::Decode<'r, sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql)
            .fetch_all(&self.pool)
            .await
            .map_err(|source| KitError::Query {
                sql: sql.to_owned(),
                source,
            })
    }

    /// The configuration of one run: the kit's, with its retry policy on every operator.
    fn run_config(&self) -> Config {
        let mut config = self.config.clone();
        let quick = RetryConfig {
            initial: Duration::from_millis(10),
            multiplier: 2.0,
            max: Duration::from_millis(100),
            retries: 3,
            on_failure: config.retry.on_failure,
        };
        config.retry = self.retry.unwrap_or(quick);
        for entry in &mut config.operators {
            let on_failure = entry.retry.map_or(quick.on_failure, |r| r.on_failure);
            entry.retry = Some(self.retry.unwrap_or(RetryConfig {
                on_failure,
                ..quick
            }));
        }
        config
    }

    /// Writes a marker row after everything written so far; returns the WAL position before
    /// it, which the marker's commit is past.
    async fn mark(&self) -> Result<Lsn, KitError> {
        const WHAT: &str = "writing the run's marker row";
        let before: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| database(WHAT, e))?;
        sqlx::query(&format!(
            "INSERT INTO streamex_testing.{MARKS} DEFAULT VALUES"
        ))
        .execute(&self.pool)
        .await
        .map_err(|e| database(WHAT, e))?;
        before.parse().map_err(|e| {
            database(
                WHAT,
                anyhow::anyhow!("pg_current_wal_lsn() gave {before:?}: {e}"),
            )
        })
    }

    /// The first of `names` that is halted, as the error a run returns.
    async fn halted(&self, names: &[String]) -> Result<Option<KitError>, KitError> {
        let states = status::load_operator_states(&self.pool, &self.config.slot)
            .await
            .map_err(|e| database("checking whether the operators halted", e))?;
        Ok(names.iter().find_map(|name| {
            let state = states.get(name)?;
            (state.state == OperatorRunState::Halted).then(|| KitError::Halted {
                operator: name.clone(),
                error: state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no error recorded".to_owned()),
            })
        }))
    }
}

fn database(what: &'static str, source: impl Into<anyhow::Error>) -> KitError {
    KitError::Database {
        what,
        source: source.into(),
    }
}

/// The kit's timing: a run reconnects quickly when the previous run's walsender still
/// holds the slot.
fn tune(config: &mut Config) {
    config.replication.reconnect_initial = Duration::from_millis(50);
    config.replication.reconnect_max = Duration::from_secs(1);
    config.replication.status_interval = Duration::from_secs(1);
}
