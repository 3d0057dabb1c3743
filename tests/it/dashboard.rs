//! The dashboard (`/dashboard` on the admin listener) in a real headless
//! Chromium driven over WebDriver (Selenium + chromedriver,
//! `support/dashboard_driver.py`): it renders live data from the API, and
//! its Resume button lifts a provider suspension so held mail is delivered.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::sink::Sink;
use crate::support::*;
use crate::suppression::{TOKEN, admin_section, api, call};

const T: Duration = Duration::from_secs(20);

/// A plain HTTP/1.0 GET without a token: (status line, headers lowercased, body).
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (String, Vec<(String, String)>, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
}

#[tokio::test]
async fn static_assets_are_embedded_and_need_no_token_but_the_data_does() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + &admin_section(""))).await;
    let admin = fwd.admin.unwrap();
    for (path, ct, needle) in [
        ("/dashboard", "text/html", "/dashboard/app.js"),
        ("/dashboard/app.js", "text/javascript", "textContent"),
        ("/dashboard/app.css", "text/css", "table"),
    ] {
        let (status, h, body) = raw_get(admin, path).await;
        assert!(status.contains(" 200 "), "{path}: {status}");
        assert!(header(&h, "content-type").starts_with(ct), "{path}: {h:?}");
        assert_eq!(header(&h, "cache-control"), "no-cache", "{path}");
        assert!(
            header(&h, "content-security-policy").starts_with("default-src 'self'"),
            "{path}: {h:?}"
        );
        assert!(body.contains(needle), "{path}");
    }
    let (status, _, _) = raw_get(admin, "/api/v1/domains").await;
    assert!(status.contains(" 401 "), "{status}");
    let (s, v) = call(&api(&fwd), Method::GET, "/api/v1/domains", None, "").await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
    // No tenant uses the guard here: configured domains are listed, unchecked.
    let domains = v["domains"].as_array().unwrap();
    assert!(!domains.is_empty(), "{v}");
    assert!(domains.iter().all(|d| d["status"] == "unchecked"), "{v}");
    assert!(domains.iter().any(|d| d["domain"] == "local.example"), "{v}");
    fwd.stop().await;
}

#[tokio::test]
async fn headless_chromium_shows_live_data_and_resumes_a_suspended_provider() {
    let chromium = require_tool("chromium");
    let _ = (chromium, require_tool("chromedriver"), require_tool("python3"));
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + &admin_section(""))).await;
    let c = api(&fwd);
    let (s, v) = call(
        &c,
        Method::POST,
        "/api/v1/suspend",
        Some("application/json"),
        r#"{"scope": "provider", "provider": "other", "for": "1h", "reason": "dashboard test"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
    for i in 0..3 {
        submit(&fwd, &[&format!("r{i}@dest.test")], "held for the dashboard").await;
    }
    fwd.wait_events(3, T, is("received")).await;
    assert!(sink.messages().is_empty(), "provider `other` is suspended");

    let shot = work.dir.path().join("dashboard.png");
    let profile = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/support/dashboard_driver.py");
    let url = format!("http://{}/dashboard#token={TOKEN}", fwd.admin.unwrap());
    let run = tokio::process::Command::new("/usr/bin/python3")
        .arg(script)
        .arg(&url)
        .arg(&shot)
        .arg("other")
        .arg(profile.path())
        .arg("r0@dest.test")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the browser run finishes within 60 s")
        .expect("/usr/bin/python3 runs (Debian python3 with python3-selenium)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("driver output is not JSON ({e}): {stdout}\nstderr: {stderr}"));
    assert_eq!(r["ok"], true, "browser run failed: {r:#}\nstderr: {stderr}");

    // The page rendered API data, and the screenshot shows it.
    assert!(r["received"].as_f64().unwrap() >= 3.0, "{r:#}");
    assert!(r["provider_row"].as_str().unwrap().contains("suspended"), "{r:#}");
    assert!(
        r["holds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h.as_str().unwrap().contains("dashboard test")),
        "{r:#}"
    );
    assert!(
        r["domains"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d.as_str().unwrap().contains("local.example")),
        "{r:#}"
    );
    assert_eq!(r["error_box"], "", "{r:#}");
    // The trace view found the message by recipient and lists its events.
    let results = r["trace_results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{r:#}");
    assert!(results[0].as_str().unwrap().contains("r0@dest.test"), "{r:#}");
    assert!(
        r["trace_events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("received")),
        "{r:#}"
    );
    assert_ne!(r["updated"], "never", "{r:#}");
    let png = std::fs::read(&shot).expect("screenshot written");
    // Keep it for a look (CI artifact) when asked.
    if let Ok(keep) = std::env::var("SENDGUARD_DASHBOARD_SCREENSHOT") {
        std::fs::write(&keep, &png).unwrap();
    }
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        r["png"]["width"].as_u64().unwrap(),
        r["png"]["height"].as_u64().unwrap(),
    );
    assert!(w >= 800 && h >= 600, "{r:#}");
    assert!(
        png.len() > 20_000,
        "a rendered page, not a blank one: {} bytes",
        png.len()
    );
    assert!(
        r["received_png"]["dark_pixels"].as_u64().unwrap() > 20,
        "the received counter is drawn: {r:#}"
    );
    // No CSP violation or script error in the console.
    let severe: Vec<&Value> = r["console"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["level"] == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "console errors: {severe:#?}");

    // The click lifted the hold, and the held mail goes out.
    let (s, q) = call(&c, Method::GET, "/api/v1/queues", None, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(q["provider_holds"], serde_json::json!([]), "{q:#}");
    fwd.wait_events(3, T, is("delivered")).await;
    let deadline = std::time::Instant::now() + T;
    while sink.messages().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "held mail not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fwd.stop().await;
}
