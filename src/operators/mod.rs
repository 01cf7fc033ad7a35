//! The registry of Rust operators: the one place where an operator is given its name.
//!
//! To add one: write a type implementing [`crate::operator::Operator`] in a module here, and
//! add a line to [`registry`] mapping its name to a constructor that takes the operator's
//! `[[operators]]` entry from the configuration. Then name it in the configuration.

mod count;
mod tallies;

use std::collections::BTreeMap;

use anyhow::{Context, bail};

pub use count::CountEvents;
pub use tallies::PostCommentTallies;

use crate::config::OperatorConfig;
use crate::operator::{AnyOperator, SqlOperator};

/// Builds a Rust operator from its configuration entry.
pub type Constructor = fn(&OperatorConfig) -> anyhow::Result<AnyOperator>;

/// Every Rust operator, by name.
pub fn registry() -> BTreeMap<&'static str, Constructor> {
    let mut registry: BTreeMap<&'static str, Constructor> = BTreeMap::new();
    registry.insert("post_comment_tallies", |_| {
        Ok(AnyOperator::new(PostCommentTallies))
    });
    registry.insert("count_events", |config| {
        Ok(AnyOperator::new(CountEvents::from_settings(
            &config.settings,
        )?))
    });
    registry
}

/// Builds the operators the configuration names: declarative ones (with `query`) from their
/// entry, Rust ones from the registry.
pub fn build(configs: &[OperatorConfig]) -> anyhow::Result<Vec<AnyOperator>> {
    let registry = registry();
    configs
        .iter()
        .map(|config| {
            if config.query.is_some() {
                let op = SqlOperator::from_config(config)?;
                return Ok(AnyOperator::new(op));
            }
            let Some(constructor) = registry.get(config.name.as_str()) else {
                let known: Vec<&str> = registry.keys().copied().collect();
                bail!(
                    "operators: no operator is registered under the name {:?}: registered Rust operators are {}; \
                     a declarative operator needs `query` and `id`",
                    config.name,
                    known.join(", ")
                );
            };
            constructor(config).with_context(|| format!("operators.{}", config.name))
        })
        .collect()
}
