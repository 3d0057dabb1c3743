//! Reply classification against a corpus of real-world replies
//! (`tests/data/classify_corpus.tsv`): every reply gets the outcome and
//! category a deliverability engineer would give it, nothing that is the
//! sender's or the path's problem ever suppresses a recipient, and the
//! `sendguard classify` command shows the same (with an operator override).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use sendguard::classify::{Category, Classification, Classifier, Outcome, parse_reply};

use crate::support::{Workdir, standard_config};

const CORPUS: &str = "tests/data/classify_corpus.tsv";

/// Sources that must each appear in the corpus.
const REQUIRED_SOURCES: [&str; 8] = [
    "gmail",
    "microsoft",
    "yahoo",
    "icloud",
    "ses",
    "postfix",
    "exim",
    "sendgrid",
];

/// Categories that are the sender's or the path's problem: a reply in one
/// of them must never classify as a recipient-suppressing category.
const NEVER_SUPPRESS: [Category; 6] = [
    Category::RateLimited,
    Category::Greylisted,
    Category::ReputationBlocked,
    Category::AuthFailed,
    Category::Policy,
    Category::RelayDenied,
];

struct Case {
    line: usize,
    source: String,
    outcome: Outcome,
    category: Category,
    /// As in the file (`\n` literal), for messages.
    raw: String,
    /// With `\n` turned into CRLF, as an upstream sends it.
    reply: String,
}

fn outcome_of(token: &str) -> Option<Outcome> {
    [Outcome::Delivered, Outcome::Deferred, Outcome::Bounced]
        .into_iter()
        .find(|o| o.as_str() == token)
}

fn category_of(token: &str) -> Option<Category> {
    Category::ALL.into_iter().find(|c| c.as_str() == token)
}

fn corpus() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(CORPUS);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let (_, header) = rows.next().expect("corpus has a header line");
    assert_eq!(
        header.split('\t').collect::<Vec<_>>(),
        ["source", "outcome", "category", "reply"],
        "{CORPUS}: header"
    );
    let mut cases = Vec::new();
    for (line, row) in rows {
        let f: Vec<&str> = row.splitn(4, '\t').collect();
        assert_eq!(f.len(), 4, "{CORPUS}:{line}: want 4 tab-separated fields: {row:?}");
        let outcome = outcome_of(f[1]).unwrap_or_else(|| panic!("{CORPUS}:{line}: unknown outcome {:?}", f[1]));
        let category = category_of(f[2]).unwrap_or_else(|| panic!("{CORPUS}:{line}: unknown category {:?}", f[2]));
        assert!(
            !f[0].is_empty() && !f[3].trim().is_empty(),
            "{CORPUS}:{line}: empty field"
        );
        cases.push(Case {
            line,
            source: f[0].to_string(),
            outcome,
            category,
            raw: f[3].to_string(),
            reply: f[3].replace("\\n", "\r\n"),
        });
    }
    cases
}

fn classify(c: &Classifier, case: &Case) -> Classification {
    c.classify(&parse_reply(&case.reply))
}

fn show(c: &Classification) -> String {
    format!(
        "{}/{} (rule {})",
        c.outcome.as_str(),
        c.category.map_or("-", |c| c.as_str()),
        c.rule
    )
}

#[test]
fn corpus_classifies_as_expected() {
    let cases = corpus();
    let classifier = Classifier::builtin();
    let mut problems = Vec::new();

    // Breadth of the corpus.
    let mut seen = BTreeSet::new();
    for case in &cases {
        if !seen.insert(case.reply.as_str()) {
            problems.push(format!("{CORPUS}:{}: duplicate reply {:?}", case.line, case.raw));
        }
    }
    if seen.len() < 110 {
        problems.push(format!("only {} distinct replies (want at least 110)", seen.len()));
    }
    let mut per_category: BTreeMap<&str, usize> = Category::ALL.iter().map(|c| (c.as_str(), 0)).collect();
    for case in &cases {
        *per_category.get_mut(case.category.as_str()).unwrap() += 1;
    }
    for (category, n) in &per_category {
        if *n < 3 {
            problems.push(format!("category {category}: {n} replies (want at least 3)"));
        }
    }
    let sources: BTreeSet<&str> = cases.iter().map(|c| c.source.as_str()).collect();
    for s in REQUIRED_SOURCES {
        if !sources.contains(s) {
            problems.push(format!("no reply from source {s}"));
        }
    }
    let dsn = cases
        .iter()
        .filter(|c| c.raw.to_ascii_lowercase().starts_with("diagnostic-code:"))
        .count();
    if dsn < 15 {
        problems.push(format!("only {dsn} DSN-style Diagnostic-Code lines (want at least 15)"));
    }

    // Every reply: the expected outcome and category.
    let mut wrong = 0;
    for case in &cases {
        let got = classify(&classifier, case);
        if got.outcome != case.outcome || got.category != Some(case.category) {
            wrong += 1;
            problems.push(format!(
                "{CORPUS}:{} [{}] {:?}\n    expected {}/{}, got {}",
                case.line,
                case.source,
                case.raw,
                case.outcome.as_str(),
                case.category.as_str(),
                show(&got)
            ));
        }
        if got.rule.is_empty() || got.stage.is_none() {
            problems.push(format!("{CORPUS}:{}: no rule name or stage: {got:?}", case.line));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} replies misclassified; {} problem(s):\n{}",
        wrong,
        cases.len(),
        problems.len(),
        problems.join("\n")
    );
}

/// Rate limits, greylisting, blocklists, SPF/DKIM/DMARC, policy and our own
/// relay account must never suppress a recipient, whatever else the reply
/// says ("User unknown" inside a sender-verify failure, `5.2.1` on a
/// flooded mailbox, `5.4.1` ...).
#[test]
fn classify_never_suppresses_sender_side_failures() {
    let classifier = Classifier::builtin();
    let cases = corpus();
    let mut checked = 0;
    let mut bad = Vec::new();
    for case in cases.iter().filter(|c| NEVER_SUPPRESS.contains(&c.category)) {
        checked += 1;
        let got = classify(&classifier, case);
        if got.category.is_some_and(Category::suppresses) {
            bad.push(format!(
                "{CORPUS}:{} [{}] {:?}\n    is {}, classified {}",
                case.line,
                case.source,
                case.raw,
                case.category.as_str(),
                show(&got)
            ));
        }
    }
    assert!(checked >= 60, "only {checked} sender-side replies in the corpus");
    assert!(
        bad.is_empty(),
        "{} sender-side replies would suppress the recipient:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn classify_cli(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .arg("classify")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sendguard classify {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn classify_cli_json_and_operator_rules() {
    const REPLY: &str = "550-5.1.1 The email account that you tried to reach does not exist";
    let v = classify_cli(&[REPLY, "--json"]);
    assert_eq!(v["outcome"], "bounced", "{v}");
    assert_eq!(v["category"], "user_unknown", "{v}");
    assert_eq!(v["stage"], "recipient", "{v}");
    assert!(v["rule"].as_str().is_some_and(|r| !r.is_empty()), "{v}");

    // An operator rule (tried before the built-in ones) changes the result.
    let w = Workdir::new();
    std::fs::write(
        w.path("rules.toml"),
        r#"
[[rule]]
name = "operator_override"
enhanced = "5.1.1"
text = 'tried to reach does not exist'
category = "policy"
outcome = "deferred"
"#,
    )
    .unwrap();
    let cfg = w.write_config(&standard_config(
        ["127.0.0.1:2587", "127.0.0.1:2465", "127.0.0.1:2525"],
        "[classify]\nrules_file = \"rules.toml\"\n",
    ));
    let check = Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["check-config", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let cfg = cfg.to_str().unwrap();
    let v = classify_cli(&[REPLY, "--config", cfg, "--json"]);
    assert_eq!(v["outcome"], "deferred", "{v}");
    assert_eq!(v["category"], "policy", "{v}");
    assert_eq!(v["rule"], "operator_override", "{v}");
    // Replies the override does not match still get the built-in rules.
    let v = classify_cli(&["452 4.2.2 Mailbox full", "--config", cfg, "--json"]);
    assert_eq!(
        (v["outcome"].as_str(), v["category"].as_str()),
        (Some("deferred"), Some("mailbox_full")),
        "{v}"
    );
}
