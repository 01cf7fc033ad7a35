//! Operators that ship with streamex: the blog example's tallies (which `streamex demo` runs),
//! a counting operator (which the benchmarks run), and [`Webhook`], which posts events to a
//! URL (`[[operators]] webhook = { .. }`). Your own operators live in your own crate: see
//! `examples/blog-app` and [`crate::operator::Registry`].

mod count;
mod tallies;
mod webhook;

pub use count::{CountEvents, CountSettings};
pub use tallies::PostCommentTallies;
pub use webhook::{Webhook, WebhookBuilder, WebhookError};

use crate::config::OperatorConfig;
use crate::operator::{AnyOperator, Registry};

/// The operators that ship with streamex, as the stock `streamex` binary registers them.
pub fn registry() -> Registry {
    Registry::new()
        .register("post_comment_tallies", || PostCommentTallies)
        .register_with("count_events", |settings: CountSettings| {
            Ok(CountEvents::from_settings(settings))
        })
}

/// Builds the operators the configuration names with [`registry`].
pub fn build(configs: &[OperatorConfig]) -> anyhow::Result<Vec<AnyOperator>> {
    Ok(registry().build(configs)?)
}
