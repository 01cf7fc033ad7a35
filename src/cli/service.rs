//! `streamex setup`, `streamex run` and `streamex resume`: the service, through the library's
//! own [`Service`].

use std::path::PathBuf;

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Service;
use crate::config::Config;
use crate::operator::Registry;
use crate::replication::ConnectParams;
use crate::status;

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file.
    #[arg(
        long,
        short,
        env = "STREAMEX_CONFIG",
        default_value = "config/streamex.toml"
    )]
    pub config: PathBuf,
}

/// Reads the configuration and checks that every operator it names can be built, before
/// anything is connected.
pub(super) fn load(args: &ConfigArgs, registry: &Registry) -> anyhow::Result<Config> {
    let config = Config::load(&args.config)?;
    registry.build(&config.operators)?;
    Ok(config)
}

/// The configuration, without building its operators (`status` and `resume` must work when
/// an operator's settings are what is broken), then a pool on the configured database,
/// retrying while it is unreachable.
pub(super) async fn connect(
    args: &ConfigArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Config, ConnectParams, PgPool)> {
    let config = Config::load(&args.config)?;
    let params = ConnectParams::parse(&config.database_url).context("database_url")?;
    let pool = crate::service::connect(&params, shutdown).await?;
    Ok((config, params, pool))
}

pub async fn setup_command(
    args: ConfigArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = load(&args, registry)?;
    let (publication, slot) = (config.publication.clone(), config.slot.clone());
    Service::builder()
        .config(config)
        .registry(registry.clone())
        .build_until(shutdown)
        .await?;
    println!("ready: schema streamex, publication {publication:?} and slot {slot:?} in place");
    Ok(())
}

pub async fn run_command(
    args: ConfigArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = load(&args, registry)?;
    let service = Service::builder()
        .config(config)
        .registry(registry.clone())
        .build_until(shutdown.clone())
        .await?;
    service.run_until(shutdown).await?;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The halted operator.
    pub operator: String,
    /// Set the event it halted on aside as a dead letter (in `streamex.dead_letters`) instead
    /// of handling it again: for a change that can never succeed, such as a delete whose old
    /// record lacks a column (it was written under REPLICA IDENTITY DEFAULT and cannot be
    /// re-read otherwise).
    #[arg(long)]
    pub skip_current: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn resume_command(args: ResumeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, _, pool) = connect(&args.config, &shutdown).await?;
    status::migrate(&pool).await?;
    let states = status::load_operator_states(&pool, &config.slot).await?;
    // An operator left out of the configuration may still have a halt stored for this slot.
    if !config.operators.iter().any(|o| o.name == args.operator)
        && !states.contains_key(&args.operator)
    {
        let names: Vec<&str> = config.operators.iter().map(|o| o.name.as_str()).collect();
        bail!(
            "no operator {:?} in {} nor stored for slot {:?}: configured operators are {}",
            args.operator,
            args.config.config.display(),
            config.slot,
            names.join(", ")
        );
    }
    if !states
        .get(&args.operator)
        .is_some_and(|s| s.state == status::OperatorRunState::Halted)
    {
        println!("operator {:?} is not halted; nothing to do", args.operator);
        return Ok(());
    }
    if args.skip_current {
        match status::set_operator_running_skipping(&pool, &config.slot, &args.operator).await? {
            Some(position) => println!(
                "operator {:?} set to running; it sets the event at {position} aside in \
                 streamex.dead_letters instead of handling it",
                args.operator
            ),
            None => bail!(
                "operator {:?} is halted, but not on an event: nothing to skip; resume it without \
                 --skip-current",
                args.operator
            ),
        }
        return Ok(());
    }
    status::set_operator_running(&pool, &config.slot, &args.operator).await?;
    println!(
        "operator {:?} set to running; a running service picks it up within seconds and replays from the slot's position",
        args.operator
    );
    Ok(())
}
