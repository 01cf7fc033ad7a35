//! The blog-app binary: every streamex command (`setup`, `run`, `status`, `resume`, `tail`,
//! `demo`) with the application's operators.
//!
//! ```sh
//! blog-app setup --config config.toml
//! blog-app run --config config.toml
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    streamex::cli::main(blog_app::registry())
}
