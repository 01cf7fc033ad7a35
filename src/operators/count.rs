//! `count_events`: counts the events of the entities it is given, without touching the
//! database. The benchmarks use it to measure the service's own overhead.
//!
//! Settings: `entities = ["posts", "comments"]` (default: posts and comments).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;

use crate::event::Event;
use crate::operator::{Context, Delivery, Operator, Subscription};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CountEvents {
    entities: Vec<String>,
    count: Arc<AtomicU64>,
}

impl CountEvents {
    pub fn new(entities: &[&str]) -> Self {
        CountEvents {
            entities: entities.iter().map(|e| (*e).to_owned()).collect(),
            count: Arc::default(),
        }
    }

    pub fn from_settings(settings: &toml::Table) -> anyhow::Result<Self> {
        let entities = match settings.get("entities") {
            None => vec!["posts".to_owned(), "comments".to_owned()],
            Some(value) => value
                .clone()
                .try_into::<Vec<String>>()
                .context("settings.entities must be a list of table names")?,
        };
        Ok(CountEvents {
            entities,
            count: Arc::default(),
        })
    }

    /// How many events it has seen.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Operator for CountEvents {
    fn name(&self) -> &str {
        "count_events"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        self.entities.iter().map(|e| Subscription::all(e)).collect()
    }

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn handle(&self, _event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
