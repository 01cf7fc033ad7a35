//! A private PostgreSQL cluster for tests and demos.
