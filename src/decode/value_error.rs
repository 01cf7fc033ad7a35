//! Why a column value's text could not be converted ([`ValueError`]), and the limit on how
//! deep a value may nest ([`MAX_VALUE_DEPTH`]), which every converter keeps: value.rs for
//! arrays and composites, json.rs for `json` and `jsonb` documents. A leaf of `decode`.

/// Why a value's text could not be converted. The message names the type and the problem, and
/// never contains the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{type_name}: {problem}")]
pub struct ValueError {
    type_name: &'static str,
    problem: &'static str,
}

impl ValueError {
    pub(super) fn new(type_name: &'static str, problem: &'static str) -> Self {
        ValueError { type_name, problem }
    }

    /// The kind of type whose text was malformed (`number`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// What was wrong with it.
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

/// How deep a column value may nest: arrays and objects inside each other, counting the
/// arrays and composites around a `json` or `jsonb` document (`[[1]]` is 2 levels). A value
/// nested deeper is not decoded; the decoder leaves the column out of its record and says so
/// in the event's `decode_error`. PostgreSQL itself keeps `jsonb` some 10,000 levels deep
/// (with the default `max_stack_depth`), and `json` text without limit.
///
/// Why so few: serde_json's [`Value`](serde_json::Value) recurses once per level when it is cloned, compared,
/// serialised or dropped, and so do operators and every stage that copies an event, on a
/// tokio worker thread whose stack is 2 MiB. Measured with serde_json 1.0.154 (features
/// `arbitrary_precision`, `preserve_order`) on a fresh 2 MiB thread, a value nested as
/// objects overflows past 974 levels when cloned in a debug build (arrays: 1,920), past 1,318
/// (arrays) in `serde_json::to_value`, 1,948 serialised, 3,037 compared, 6,872 dropped; in a
/// release build past 3,631 cloned and 3,112 in `to_value` (objects), and 8,000 and more for
/// the rest. 256 levels leave a margin of about 4× in a debug build and 12× in a release
/// build for the stack that the caller already uses. The unit test
/// `values_at_twice_the_limit_are_safe_on_a_small_stack` keeps half of that margin checked.
pub const MAX_VALUE_DEPTH: usize = 256;

/// The problem of a value deeper than [`MAX_VALUE_DEPTH`] (a literal: [`ValueError`] holds
/// static text; a test checks that the number agrees).
pub(super) const TOO_DEEP: &str =
    "nested more than 256 levels deep (arrays and objects), deeper than streamex decodes";
