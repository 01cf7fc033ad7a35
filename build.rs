// Rebuild when a migration changes: `sqlx::migrate!` embeds the files in `sql/` at compile time.
fn main() {
    println!("cargo:rerun-if-changed=sql");
}
