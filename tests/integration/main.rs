//! The integration tests: one test binary, so that it links once and every test shares one
//! private PostgreSQL cluster (`streamex::testing::server`), each with a database of its own.
//! Tests that restart or reconfigure a server start a cluster of their own.
//!
//! `cargo test --test integration MODULE::` runs one file's tests, for example
//! `cargo test --test integration crash::`.

mod common;

mod backfill;
mod blog_operators;
mod chaos;
mod commands;
mod connect;
mod crash;
mod demo;
mod failover;
mod folding;
mod harness;
mod http;
mod http_routes;
mod jetstream;
mod lease;
mod names;
mod outbox;
mod partitions;
mod reconnect;
mod replication;
mod run_partitions;
mod service;
mod setups;
mod sql_operator;
mod status;
mod tail;
mod types;
mod webhook;
mod worker;
