//! The change event.

/// The kind of change an [`Event`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// One committed change to one row (or one truncated table).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
}
