//! Integration tests: one binary, real sockets on ephemeral loopback ports,
//! real TLS, real clients (swaks, Python smtplib, lettre).

mod support;

mod budgets;
mod classify;
mod cli;
mod clients;
mod dashboard;
mod deploy;
mod durability;
mod fleet;
mod forward;
mod front_end;
mod guard;
mod logs;
mod metrics;
mod policy;
mod regressions;
mod shaping;
mod smuggling;
mod spf_suite;
mod suppression;
mod trace;
mod webhooks;
