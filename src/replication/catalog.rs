//! The ordinary SQL connection pool that goes with a replication connection: the same
//! server, database, role and TLS settings, for set-up, catalog look-ups and operators.

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use super::{ConnectParams, Host, SslMode};

/// sqlx connection options for the server `params` names.
pub fn connect_options(params: &ConnectParams) -> PgConnectOptions {
    let mut options = PgConnectOptions::new_without_pgpass()
        .port(params.port)
        .username(&params.user)
        .database(&params.dbname)
        .application_name(params.application_name.as_deref().unwrap_or("streamex"))
        .ssl_mode(match params.sslmode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    options = match &params.host {
        Host::Unix(dir) => options.socket(dir),
        Host::Name(name) => options.host(name),
        Host::Ip(ip) => options.host(&ip.to_string()),
    };
    if let Some(password) = params.password() {
        options = options.password(password);
    }
    if let Some(root) = &params.sslrootcert {
        options = options.ssl_root_cert(root);
    }
    options
}

/// A pool of at most `max` connections to the server `params` names.
pub async fn catalog_pool(params: &ConnectParams, max: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(
            params
                .connect_timeout
                .unwrap_or(std::time::Duration::from_secs(30)),
        )
        .connect_with(connect_options(params))
        .await
}
