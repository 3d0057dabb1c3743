//! sendguard: an outbound send-guard SMTP proxy.
//!
//! See `docs/ARCHITECTURE.md` for the data flow and module boundaries.

pub mod admin;
pub mod classify;
pub mod cluster;
pub mod config;
pub mod dns;
pub mod dsn;
pub mod events;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod pipeline;
pub mod queue;
pub mod rate;
pub mod relay;
pub mod server;
pub mod shards;
pub mod smtp;
pub mod spool;
pub mod stream;
pub mod submission;
pub mod suppress;
pub mod throttle;
pub mod trace;
pub mod webhook;
