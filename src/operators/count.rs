//! `count_events`: counts the events of the entities it is given, without touching the
//! database. The benchmarks use it to measure the service's own overhead.
//!
//! Settings: `entities = ["posts", "comments"]` (default: posts and comments).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::event::Event;
use crate::operator::{Context, Delivery, Operator, Subscription};

/// `[[operators]] settings` of `count_events`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountSettings {
    /// The tables whose events it counts (default: posts and comments).
    pub entities: Option<Vec<String>>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CountEvents {
    entities: Vec<String>,
    count: Arc<AtomicU64>,
}

impl CountEvents {
    /// Counts the events of `entities`.
    pub fn new(entities: &[&str]) -> Self {
        CountEvents {
            entities: entities.iter().map(|e| (*e).to_owned()).collect(),
            count: Arc::default(),
        }
    }

    /// From its `[[operators]]` settings.
    pub fn from_settings(settings: CountSettings) -> Self {
        CountEvents {
            entities: settings
                .entities
                .unwrap_or_else(|| vec!["posts".to_owned(), "comments".to_owned()]),
            count: Arc::default(),
        }
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
