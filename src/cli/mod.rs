//! The `streamex` command line.
