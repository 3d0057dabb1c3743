//! Suppressions in and out: the JSON shape the admin API speaks, and bulk
//! import/export as JSON lines or CSV (RFC 4180). Input is validated
//! completely before anything is stored, so an import with one bad line
//! imports nothing; errors name the line and the field.
//!
//! Trust boundary: input comes from an authenticated operator, but is
//! parsed as untrusted: addresses are normalized, reasons and tenants
//! checked, unknown fields refused.

use serde::{Deserialize, Serialize};

use super::{Entry, Reason, normalize, rfc3339_ms};

/// One entry as a client sends it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub address: Option<String>,
    /// Absent or empty: global.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Default `manual`.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// RFC 3339; default now. Kept on import so an exported list comes
    /// back with its history.
    #[serde(default)]
    pub created_at: Option<String>,
    /// `global` or `tenant`, as exported; must agree with `tenant`.
    #[serde(default)]
    pub scope: Option<String>,
}

/// One entry as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct View {
    pub address: String,
    /// `global` or `tenant`.
    pub scope: String,
    pub tenant: Option<String>,
    pub reason: Reason,
    pub source: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

impl From<&Entry> for View {
    fn from(e: &Entry) -> View {
        View {
            address: e.address.clone(),
            scope: e.scope().into(),
            tenant: e.tenant.clone(),
            reason: e.reason,
            source: e.source.clone(),
            created_at: rfc3339_ms(e.created_ms),
            expires_at: e.expires_ms.map(rfc3339_ms),
        }
    }
}

/// Bad input: which field (prefixed with the line for bulk input) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    fn at_line(self, line: usize) -> Self {
        FieldError {
            field: format!("line {line}: {}", self.field),
            message: self.message,
        }
    }
}

/// Most bytes kept of a `source` text.
pub const MAX_SOURCE: usize = 1000;

/// How far ahead of this node's clock an imported `created_at` may be.
const CREATED_SKEW_MS: u64 = 5 * 60 * 1000;

/// Validate one input into an entry created at `now_ms`.
pub fn entry(input: Input, now_ms: u64, tenant_known: &dyn Fn(&str) -> bool) -> Result<Entry, FieldError> {
    let raw = input.address.ok_or_else(|| FieldError::new("address", "is required"))?;
    let address = normalize(&raw).map_err(|m| FieldError::new("address", format!("{raw:?}: {m}")))?;
    let tenant = match input.tenant.filter(|t| !t.is_empty()) {
        Some(t) if !tenant_known(&t) => return Err(FieldError::new("tenant", format!("no tenant named {t:?}"))),
        t => t,
    };
    let reason = match input.reason.as_deref() {
        None | Some("") => Reason::Manual,
        Some(r) => Reason::parse(r).ok_or_else(|| {
            FieldError::new(
                "reason",
                format!("unknown reason {r:?} (hard_bounce, complaint, unsubscribe, manual)"),
            )
        })?,
    };
    match (input.scope.as_deref(), &tenant) {
        (None | Some(""), _) | (Some("global"), None) | (Some("tenant"), Some(_)) => {}
        (Some("global"), Some(_)) => return Err(FieldError::new("scope", "global, but a tenant is given")),
        (Some("tenant"), None) => return Err(FieldError::new("scope", "tenant, but no tenant is given")),
        (Some(s), _) => return Err(FieldError::new("scope", format!("{s:?}: global or tenant"))),
    }
    let expires_ms = time_ms("expires_at", input.expires_at.as_deref())?;
    // An add replaces the entry of the same address and scope: one already
    // expired would lift a live suppression without a DELETE.
    if expires_ms.is_some_and(|t| t <= now_ms) {
        return Err(FieldError::new(
            "expires_at",
            "is in the past (to lift a suppression, delete it)",
        ));
    }
    let created_ms = time_ms("created_at", input.created_at.as_deref())?.unwrap_or(now_ms);
    // Newest wins between fleet nodes: a creation time ahead of the clock
    // would outlast every later change. Five minutes of skew are allowed.
    if created_ms > now_ms.saturating_add(CREATED_SKEW_MS) {
        return Err(FieldError::new("created_at", "is in the future"));
    }
    let source = clean_source(input.source.as_deref().unwrap_or_default(), MAX_SOURCE);
    Ok(Entry {
        address,
        tenant,
        reason,
        source,
        created_ms,
        expires_ms,
    })
}

/// A suppression's `source` as stored: control characters dropped (it is
/// quoted in RCPT replies and CSV lines), at most `max` bytes.
pub fn clean_source(s: &str, max: usize) -> String {
    let mut source: String = s.chars().filter(|c| !c.is_control()).collect();
    if source.len() > max {
        let mut cut = max;
        while !source.is_char_boundary(cut) {
            cut -= 1;
        }
        source.truncate(cut);
    }
    source
}

fn time_ms(field: &str, v: Option<&str>) -> Result<Option<u64>, FieldError> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => {
            let t = humantime::parse_rfc3339_weak(s)
                .map_err(|e| FieldError::new(field, format!("{s:?} is not an RFC 3339 time: {e}")))?;
            Ok(Some(
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| FieldError::new(field, "before 1970"))?
                    .as_millis() as u64,
            ))
        }
    }
}

/// JSON lines, one [`Input`] object per line; blank lines are skipped.
pub fn parse_jsonl(
    text: &str,
    now_ms: u64,
    max: usize,
    tenant_known: &dyn Fn(&str) -> bool,
) -> Result<Vec<Entry>, FieldError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if out.len() >= max {
            return Err(too_many(max));
        }
        let input: Input = serde_json::from_str(line).map_err(|e| {
            let field = unknown_field(&e.to_string()).unwrap_or_else(|| "json".into());
            FieldError::new(field, e.to_string()).at_line(i + 1)
        })?;
        out.push(entry(input, now_ms, tenant_known).map_err(|e| e.at_line(i + 1))?);
    }
    Ok(out)
}

fn too_many(max: usize) -> FieldError {
    FieldError::new(
        "entries",
        format!("more than {max} entries in one import (admin.max_import_entries)"),
    )
}

/// The field serde complained about, from its message.
pub fn unknown_field(msg: &str) -> Option<String> {
    for pat in ["unknown field `", "missing field `", "invalid type: ", "for key `"] {
        if let Some(p) = msg.find(pat) {
            if pat.starts_with("invalid") {
                return None;
            }
            let rest = &msg[p + pat.len()..];
            return rest.find('`').map(|e| rest[..e].to_string());
        }
    }
    None
}

pub const CSV_HEADER: &str = "address,tenant,reason,source,created_at,expires_at";

/// CSV with a header row naming the columns; `address` is required, the
/// others (`tenant`, `reason`, `source`, `expires_at`, `created_at`,
/// `scope`) are optional.
pub fn parse_csv(
    text: &str,
    now_ms: u64,
    max: usize,
    tenant_known: &dyn Fn(&str) -> bool,
) -> Result<Vec<Entry>, FieldError> {
    let rows = csv_rows(text)?;
    let mut it = rows.into_iter();
    let Some((_, header)) = it.next() else {
        return Ok(Vec::new());
    };
    let col = |name: &str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    for h in &header {
        let h = h.trim().to_ascii_lowercase();
        if ![
            "address",
            "tenant",
            "reason",
            "source",
            "expires_at",
            "scope",
            "created_at",
        ]
        .contains(&h.as_str())
        {
            return Err(FieldError::new("line 1: header", format!("unknown column {h:?}")));
        }
    }
    let Some(a) = col("address") else {
        return Err(FieldError::new("line 1: header", "no address column"));
    };
    let (t, r, s, x, c, sc) = (
        col("tenant"),
        col("reason"),
        col("source"),
        col("expires_at"),
        col("created_at"),
        col("scope"),
    );
    let mut out = Vec::new();
    for (line, row) in it {
        if row.len() == 1 && row[0].trim().is_empty() {
            continue;
        }
        if row.len() != header.len() {
            return Err(FieldError::new(
                format!("line {line}"),
                format!("{} fields, the header has {}", row.len(), header.len()),
            ));
        }
        if out.len() >= max {
            return Err(too_many(max));
        }
        let get = |c: Option<usize>| c.map(|c| csv_cell(&row[c]));
        let input = Input {
            address: get(Some(a)),
            tenant: get(t),
            reason: get(r),
            source: get(s),
            expires_at: get(x),
            created_at: get(c),
            scope: get(sc),
        };
        out.push(entry(input, now_ms, tenant_known).map_err(|e| e.at_line(line))?);
    }
    Ok(out)
}

/// RFC 4180 records with their starting line numbers.
fn csv_rows(text: &str) -> Result<Vec<(usize, Vec<String>)>, FieldError> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let (mut line, mut row_line) = (1usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            '"' => {
                return Err(FieldError::new(
                    format!("line {line}"),
                    "quote inside an unquoted field",
                ));
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                at_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push((row_line, std::mem::take(&mut row)));
                line += 1;
                row_line = line;
                at_start = true;
            }
            _ => {
                field.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err(FieldError::new(format!("line {row_line}"), "unterminated quoted field"));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((row_line, row));
    }
    Ok(rows)
}

/// First characters that make a spreadsheet read a cell as a formula
/// (OWASP "CSV injection"), plus the apostrophe that escapes them.
const FORMULA_START: [char; 7] = ['=', '+', '-', '@', '\t', '\r', '\''];

/// A cell an export wrote with a leading `'` (see [`csv_field`]) back to
/// its value; any other cell as it is.
fn csv_cell(s: &str) -> String {
    match s.strip_prefix('\'') {
        Some(rest) if rest.starts_with(FORMULA_START) => rest.to_string(),
        _ => s.to_string(),
    }
}

/// One CSV field. A value a spreadsheet would run as a formula (a bounced
/// address such as `=cmd|'/C calc'!A0@evil.example` is a valid address,
/// and sources can carry a remote server's text) gets a leading `'`, which
/// makes the cell text; values starting with `'` get one too, so that the
/// import ([`csv_cell`]) strips exactly what the export added.
fn csv_field(s: &str, out: &mut String) {
    let escaped;
    let s = if s.starts_with(FORMULA_START) {
        escaped = format!("'{s}");
        escaped.as_str()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

/// One CSV row (no header) for an entry, ending in CRLF.
pub fn csv_row(e: &Entry, out: &mut String) {
    let v = View::from(e);
    for (i, f) in [
        v.address.as_str(),
        v.tenant.as_deref().unwrap_or(""),
        v.reason.as_str(),
        v.source.as_str(),
        v.created_at.as_str(),
        v.expires_at.as_deref().unwrap_or(""),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            out.push(',');
        }
        csv_field(f, out);
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(t: &str) -> bool {
        t == "acme"
    }

    #[test]
    fn entry_validation_names_fields() {
        let ok = entry(
            Input {
                address: Some("A@Example.com".into()),
                tenant: Some("acme".into()),
                reason: Some("unsubscribe".into()),
                source: Some("list-unsubscribe\r\nX: y".into()),
                expires_at: Some("2030-01-01T00:00:00Z".into()),
                ..Default::default()
            },
            5,
            &known,
        )
        .unwrap();
        assert_eq!(ok.address, "a@example.com");
        assert_eq!(ok.reason, Reason::Unsubscribe);
        assert_eq!(ok.source, "list-unsubscribeX: y");
        assert_eq!(ok.expires_ms, Some(1_893_456_000_000));
        let err = |i: Input| entry(i, 5, &known).unwrap_err().field;
        assert_eq!(err(Input::default()), "address");
        let base = || Input {
            address: Some("a@b.example".into()),
            ..Default::default()
        };
        assert_eq!(
            err(Input {
                address: Some("nope".into()),
                ..base()
            }),
            "address"
        );
        assert_eq!(
            err(Input {
                reason: Some("spam".into()),
                ..base()
            }),
            "reason"
        );
        assert_eq!(
            err(Input {
                tenant: Some("ghost".into()),
                ..base()
            }),
            "tenant"
        );
        assert_eq!(
            err(Input {
                expires_at: Some("tomorrow".into()),
                ..base()
            }),
            "expires_at"
        );
        // An expiry not after now would lift a live entry of the address.
        let now = 1_893_456_000_000; // 2030-01-01T00:00:00Z
        let past = entry(
            Input {
                expires_at: Some("2030-01-01T00:00:00Z".into()),
                ..base()
            },
            now,
            &known,
        );
        assert_eq!(past.unwrap_err().field, "expires_at");
        assert!(
            entry(
                Input {
                    expires_at: Some("2030-01-01T00:00:01Z".into()),
                    ..base()
                },
                now,
                &known
            )
            .is_ok()
        );
        // A creation time ahead of the clock, beyond the skew allowed.
        let created = |t: &str| {
            entry(
                Input {
                    created_at: Some(t.into()),
                    ..base()
                },
                now,
                &known,
            )
            .map_err(|e| e.field)
        };
        assert!(created("2030-01-01T00:04:59Z").is_ok());
        assert_eq!(created("2030-01-01T00:05:01Z").unwrap_err(), "created_at");
        assert_eq!(entry(base(), 5, &known).unwrap().reason, Reason::Manual);
    }

    #[test]
    fn jsonl_is_all_or_nothing_with_line_numbers() {
        let text = "{\"address\":\"a@b.example\"}\n\n{\"address\":\"c@d.example\",\"reason\":\"complaint\"}\n";
        assert_eq!(parse_jsonl(text, 1, 10, &known).unwrap().len(), 2);
        let bad = "{\"address\":\"a@b.example\"}\n{\"address\":\"bad\"}\n";
        assert_eq!(parse_jsonl(bad, 1, 10, &known).unwrap_err().field, "line 2: address");
        let bad = "{\"address\":\"a@b.example\",\"colour\":1}\n";
        assert_eq!(parse_jsonl(bad, 1, 10, &known).unwrap_err().field, "line 1: colour");
        let bad = "{\"address\":";
        assert_eq!(parse_jsonl(bad, 1, 10, &known).unwrap_err().field, "line 1: json");
        assert_eq!(parse_jsonl(text, 1, 1, &known).unwrap_err().field, "entries");
    }

    #[test]
    fn csv_round_trip() {
        let entries = vec![
            Entry {
                address: "a@b.example".into(),
                tenant: Some("acme".into()),
                reason: Reason::HardBounce,
                source: "550 5.1.1 \"no\", said the server\nreally".into(),
                created_ms: 1_000,
                expires_ms: None,
            },
            Entry {
                address: "c@d.example".into(),
                tenant: None,
                reason: Reason::Manual,
                source: String::new(),
                created_ms: 2_000,
                expires_ms: Some(1_893_456_000_000),
            },
        ];
        let mut text = format!("{CSV_HEADER}\r\n");
        for e in &entries {
            csv_row(e, &mut text);
        }
        let back = parse_csv(&text, 7, 10, &known).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].address, "a@b.example");
        assert_eq!(back[0].tenant.as_deref(), Some("acme"));
        // control characters are dropped from sources on input
        assert_eq!(back[0].source, "550 5.1.1 \"no\", said the serverreally");
        assert_eq!(back[1].expires_ms, Some(1_893_456_000_000));
        // created times survive the round trip
        assert_eq!((back[0].created_ms, back[1].created_ms), (1_000, 2_000));
        assert_eq!(back[1].tenant, None);
    }

    /// Cells a spreadsheet would run as formulas are exported as text
    /// (leading `'`), and an import of the export gets the values back.
    #[test]
    fn csv_cells_are_never_formulas_and_round_trip() {
        let risky = [
            "=cmd|'/C calc'!A0@evil.example",
            "+1@b.example",
            "-x@b.example",
            "'=x@b.example",
            "'plain@b.example",
        ];
        let entries: Vec<Entry> = risky
            .iter()
            .map(|a| Entry {
                address: a.to_string(),
                tenant: None,
                reason: Reason::Manual,
                source: format!("=HYPERLINK(\"http://evil.example\",\"{a}\")"),
                created_ms: 1_000,
                expires_ms: None,
            })
            .collect();
        let mut text = format!("{CSV_HEADER}\r\n");
        for e in &entries {
            csv_row(e, &mut text);
        }
        let rows = csv_rows(&text).unwrap();
        for (line, row) in &rows {
            // Every cell, as a spreadsheet reads it, starts with something
            // it does not evaluate.
            for cell in row {
                assert!(
                    !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                    "line {line}: {row:?}"
                );
            }
        }
        assert!(text.contains("'=cmd|'/C calc'!A0@evil.example,"), "{text}");
        assert!(text.contains("''=x@b.example,"), "{text}");
        assert!(text.contains("''plain@b.example,"), "{text}");
        assert!(text.contains("\"'=HYPERLINK("), "{text}");
        let back: Vec<String> = rows.iter().skip(1).map(|(_, r)| csv_cell(&r[0])).collect();
        assert_eq!(back, risky);
        let sources: Vec<String> = rows.iter().skip(1).map(|(_, r)| csv_cell(&r[3])).collect();
        assert!(sources.iter().zip(&entries).all(|(s, e)| *s == e.source));
        // Values no export escapes are read as they are.
        assert_eq!(csv_cell("'x"), "'x");
        assert_eq!(csv_cell("x'"), "x'");
    }

    #[test]
    fn csv_errors() {
        let e = |t: &str| parse_csv(t, 1, 10, &known).unwrap_err().field;
        assert_eq!(e("address,colour\na@b.example,red\n"), "line 1: header");
        assert_eq!(e("reason\nmanual\n"), "line 1: header");
        assert_eq!(e("address,reason\na@b.example\n"), "line 2");
        assert_eq!(e("address,reason\na@b.example,manual\nx,manual\n"), "line 3: address");
        assert_eq!(e("address\n\"a@b.example\n"), "line 2");
        assert_eq!(e("address\na\"b@c.example\n"), "line 2");
        assert_eq!(
            parse_csv("address\r\na@b.example\r\n\r\n", 1, 10, &known)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_csv("address\na@b.example\nc@d.example\n", 1, 1, &known)
                .unwrap_err()
                .field,
            "entries"
        );
    }
}
