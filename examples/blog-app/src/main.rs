//! The blog-app binary: the streamex commands (`setup`, `run`, `status`, `resume`, `tail`)
//! with the application's operators; `demo` runs streamex's own blog example.
//!
//! ```sh
//! blog-app setup --config config.toml
//! blog-app run --config config.toml
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    streamex::cli::App::new(blog_app::registry())
        .name("blog-app")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The blog application: streamex with the post_titles operator")
        .main()
}
