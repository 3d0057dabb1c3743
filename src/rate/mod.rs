//! Rate policy: provider grouping, delivery shaping, submission budgets,
//! adaptive back-off.
//!
//! Trust boundary: pure decisions over a clock and inputs (see
//! `crate::throttle`); the only I/O is the MX lookup behind
//! [`providers::Providers`], through the guard's cached resolver.

pub mod breaker;
pub mod budget;
pub mod policy;
pub mod providers;
pub mod runaway;
pub mod shaper;
