//! Per-recipient outcome of one delivery attempt, from the replies of the
//! transaction (RFC 5321 §4.2.1: 2yz done, 4yz transient, 5yz permanent),
//! and whose reply decided it. Pure; the detailed classification
//! (categories) comes with the classifier, this decides only delivered /
//! deferred / bounced.

use crate::events::ReplyRecord;
use crate::relay::client::TxReplies;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(ReplyRecord),
    Deferred(ReplyRecord),
    Bounced(ReplyRecord),
}

/// Which reply decided a recipient's outcome. Only a recipient's own RCPT
/// reply says something about that address for sure: a reply to MAIL FROM
/// is about the reverse-path or the session (RFC 5321 §3.3), and a reply to
/// DATA or to the end of data is about the message, for every recipient
/// the upstream had accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The recipient's own RCPT reply.
    Recipient,
    /// The reply to MAIL FROM.
    Sender,
    /// The reply to DATA or to the end of data; this recipient's RCPT was
    /// accepted.
    Message,
    /// No reply: the connection failed or broke, or sendguard refused
    /// locally.
    Path,
}

/// The upstream's "too many recipients" for one transaction (RFC 5321
/// §4.5.3.1.10: 452, or 552 from older servers; RFC 3463 X.5.3).
pub fn too_many_recipients(r: &ReplyRecord) -> bool {
    matches!(r.code, Some(452 | 552))
        && (r.enhanced.as_deref().is_some_and(|e| e.get(1..) == Some(".5.3"))
            || r.text.to_ascii_lowercase().contains("too many recipients"))
}

fn by_class(r: &ReplyRecord) -> Outcome {
    match r.code {
        Some(c) if (200..300).contains(&c) => Outcome::Delivered(r.clone()),
        Some(c) if (500..600).contains(&c) => Outcome::Bounced(r.clone()),
        _ => Outcome::Deferred(r.clone()),
    }
}

fn ok(r: &ReplyRecord) -> bool {
    r.code.is_some_and(|c| (200..300).contains(&c))
}

/// Outcomes for `n` recipients sent in that order.
pub fn outcomes(tx: &TxReplies, n: usize) -> Vec<(Outcome, Scope)> {
    let broken = || {
        (
            Outcome::Deferred(ReplyRecord::local(
                tx.error.clone().unwrap_or_else(|| "transaction incomplete".into()),
            )),
            Scope::Path,
        )
    };
    let Some(mail) = &tx.mail else {
        return vec![broken(); n];
    };
    if !ok(mail) {
        return vec![(by_class(mail), Scope::Sender); n];
    }
    (0..n)
        .map(|i| match tx.rcpts.get(i) {
            None => broken(),
            Some(r) if !ok(r) => (by_class(r), Scope::Recipient),
            Some(_) => match (&tx.data, &tx.done) {
                (_, Some(done)) => (by_class(done), Scope::Message),
                // DATA refused: that reply decides. A 2xx to DATA (instead of 354)
                // means no content was sent: never "delivered".
                (Some(data), None) if data.code.is_some_and(|c| c >= 400) => (by_class(data), Scope::Message),
                _ => broken(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, text: &str) -> ReplyRecord {
        ReplyRecord {
            code: Some(code),
            enhanced: None,
            text: text.into(),
        }
    }

    #[test]
    fn two_hundred_to_data_is_not_delivered() {
        let ok = r(250, "ok");
        let tx = TxReplies {
            mail: Some(ok.clone()),
            rcpts: vec![ok.clone()],
            // DATA answered 250 instead of 354: no content was sent
            data: Some(ok.clone()),
            ..Default::default()
        };
        assert!(matches!(outcomes(&tx, 1)[0], (Outcome::Deferred(_), Scope::Path)));
    }

    #[test]
    fn table() {
        use Outcome::*;
        use Scope::*;
        let ok250 = r(250, "ok");
        let cases: Vec<(TxReplies, Vec<(Outcome, Scope)>)> = vec![
            // all good
            (
                TxReplies {
                    mail: Some(ok250.clone()),
                    rcpts: vec![ok250.clone(), ok250.clone()],
                    data: Some(r(354, "go")),
                    done: Some(r(250, "queued")),
                    ..Default::default()
                },
                vec![
                    (Delivered(r(250, "queued")), Message),
                    (Delivered(r(250, "queued")), Message),
                ],
            ),
            // mixed RCPT replies in one transaction
            (
                TxReplies {
                    mail: Some(ok250.clone()),
                    rcpts: vec![r(550, "unknown"), r(452, "full"), ok250.clone()],
                    data: Some(r(354, "go")),
                    done: Some(r(250, "q")),
                    ..Default::default()
                },
                vec![
                    (Bounced(r(550, "unknown")), Recipient),
                    (Deferred(r(452, "full")), Recipient),
                    (Delivered(r(250, "q")), Message),
                ],
            ),
            // MAIL refused: every recipient shares its fate
            (
                TxReplies {
                    mail: Some(r(451, "later")),
                    rcpts: vec![r(503, "seq")],
                    data: Some(r(503, "seq")),
                    ..Default::default()
                },
                vec![(Deferred(r(451, "later")), Sender)],
            ),
            (
                TxReplies {
                    mail: Some(r(553, "no")),
                    ..Default::default()
                },
                vec![(Bounced(r(553, "no")), Sender), (Bounced(r(553, "no")), Sender)],
            ),
            // DATA refused
            (
                TxReplies {
                    mail: Some(ok250.clone()),
                    rcpts: vec![ok250.clone()],
                    data: Some(r(554, "no data")),
                    ..Default::default()
                },
                vec![(Bounced(r(554, "no data")), Message)],
            ),
            // end of data 4xx
            (
                TxReplies {
                    mail: Some(ok250.clone()),
                    rcpts: vec![ok250.clone(), r(550, "x")],
                    data: Some(r(354, "go")),
                    done: Some(r(451, "try later")),
                    ..Default::default()
                },
                vec![
                    (Deferred(r(451, "try later")), Message),
                    (Bounced(r(550, "x")), Recipient),
                ],
            ),
            // connection lost after RCPTs: refused stay bounced, others deferred
            (
                TxReplies {
                    mail: Some(ok250.clone()),
                    rcpts: vec![r(550, "x"), ok250.clone()],
                    data: Some(r(354, "go")),
                    error: Some("closed".into()),
                    ..Default::default()
                },
                vec![
                    (Bounced(r(550, "x")), Recipient),
                    (Deferred(ReplyRecord::local("closed")), Path),
                ],
            ),
            // nothing at all
            (
                TxReplies {
                    error: Some("reset".into()),
                    ..Default::default()
                },
                vec![(Deferred(ReplyRecord::local("reset")), Path)],
            ),
        ];
        for (tx, want) in cases {
            assert_eq!(outcomes(&tx, want.len()), want, "{tx:?}");
        }
    }
}
