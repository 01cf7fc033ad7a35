//! The pgoutput decoder and the conversion of column values to JSON.

mod types;
mod value;

pub use types::{MAX_DEPTH, PgType, TypeCache, TypeError};
pub use value::{ValueError, text_to_json};
