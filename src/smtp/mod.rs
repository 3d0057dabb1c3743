//! The pure SMTP core: framing, command parsing, content receivers, replies.
//! No I/O and no policy here; see `server::session` for the state machine.

pub mod address;
pub mod command;
pub mod data;
pub mod line;
pub mod reply;

pub use address::Mailbox;
pub use command::{Command, MailParams, ParseError};
pub use reply::{Enhanced, Reply};
