//! blog-app's tests, in one binary so that the private PostgreSQL cluster starts once: the
//! operator through the real pipeline (streamex::testing::OperatorTest), its settings as
//! config.toml gives them, the application's own binary, and the service embedded with
//! `Service::builder()`.

mod binary;
mod embedded;
mod post_titles;
mod settings;

/// The application's schema and configuration, as shipped.
const SCHEMA: &str = include_str!("../../schema.sql");
const CONFIG: &str = include_str!("../../config.toml");

/// What post_titles holds, in order.
const TITLES: &str = "SELECT post_id, title FROM post_titles ORDER BY 1";
