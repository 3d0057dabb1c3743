//! Forwarding to the upstream smarthost: the SMTP client and the workers
//! that take jobs from the queue.

pub mod client;
pub mod dispatch;
pub mod stream;
