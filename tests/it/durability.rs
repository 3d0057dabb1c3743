//! No loss: under load, `kill -9` the proxy at a random moment, restart it,
//! and every message that had received 250 reaches the sink. Duplicates are
//! allowed only for messages in flight at the kill, and are counted.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::support::client::Client;
use crate::support::sink::{Sink, free_port};
use crate::support::{Workdir, standard_config};

const RELAY_CONNECTIONS: usize = 4;

pub(crate) fn spawn(cfg: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["serve", "--config"])
        .arg(cfg)
        .env("SENDGUARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Wait until the server greets: the port is bound before the spool is
/// recovered and the classifier compiled, so a connect alone can come
/// long before the server serves (and the kill must land under load).
pub(crate) async fn wait_port(addr: std::net::SocketAddr) {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let mut buf = [0u8; 3];
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await
                && &buf == b"220"
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "server did not come up on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Send messages in a loop on one session until the connection dies;
/// record the subjects acknowledged with 250.
async fn load(
    addr: std::net::SocketAddr,
    worker: usize,
    body_len: usize,
    pause: Duration,
    acked: Arc<Mutex<HashSet<String>>>,
) {
    let (mut c, g) = Client::connect(addr).await;
    if g.code != 220 {
        return;
    }
    if !c.try_send_raw(b"EHLO load.test\r\n").await || c.try_reply(Duration::from_secs(5)).await.is_none() {
        return;
    }
    for n in 0.. {
        let subject = format!("kill-{worker}-{n}");
        let msg = format!("MAIL FROM:<load@local.example>\r\nRCPT TO:<r{worker}@dest.example>\r\nDATA\r\n");
        if !c.try_send_raw(msg.as_bytes()).await {
            return;
        }
        for _ in 0..3 {
            match c.try_reply(Duration::from_secs(10)).await {
                Some(r) if r.code < 400 => {}
                _ => return,
            }
        }
        // Lines of 76 octets (RFC 5322's 998-octet limit applies).
        let line = format!("{}\r\n", "x".repeat(76));
        let text = line.repeat(body_len / line.len() + 1);
        let body = format!(
            "Subject: {subject}\r\n\r\n{}.\r\n",
            &text[..body_len - body_len % line.len()]
        );
        if !c.try_send_raw(body.as_bytes()).await {
            return;
        }
        match c.try_reply(Duration::from_secs(10)).await {
            Some(r) if r.code == 250 => {
                acked.lock().unwrap().insert(subject);
            }
            _ => return,
        }
        tokio::time::sleep(pause).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing() {
    kill_9_rounds(1500, Duration::ZERO, 300).await;
}

/// The same with 128 KiB messages and longer rounds: the kills land while
/// spool segments fill, roll over, and are recycled (written over under a
/// new tag, their old records still in them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_segments_roll_over_loses_nothing() {
    let recycled = kill_9_rounds(128 * 1024, Duration::from_millis(10), 1500).await;
    assert!(recycled > 0, "no segment was recycled under test");
}

/// Three rounds of load (each session pausing `pause` after each message)
/// and `kill -9` (`min_ms` to `min_ms` + 600 ms in), a
/// restart, and the check that every acknowledged message reached the
/// sink. Returns how many segments were kept for reuse in `tmp/` at the
/// kills.
async fn kill_9_rounds(body_len: usize, pause: Duration, min_ms: u64) -> usize {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let sections = format!(
        "[spool]\ndir = \"spool\"\n[relay]\naddr = \"{}\"\ntls = \"none\"\nmax_connections = {RELAY_CONNECTIONS}\n[queue]\nfirst_retry = \"200ms\"\nmax_retry = \"1s\"\n[events]\npath = \"events.jsonl\"\n[shaping]\ngroup_by_mx = false\n",
        sink.addr
    );
    let text = standard_config(["127.0.0.1:0", "127.0.0.1:0", &format!("127.0.0.1:{port}")], &sections);
    let cfg = work.write_config(&text);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut total_acked = HashSet::new();
    let mut spooled_at_kill = 0;
    let (mut segments, mut recycled_at_kill) = (0, 0);
    for round in 0..3 {
        let mut child = spawn(&cfg);
        wait_port(addr).await;
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = Vec::new();
        for w in 0..8 {
            tasks.push(tokio::spawn(load(
                addr,
                round * 100 + w,
                body_len,
                pause,
                Arc::clone(&acked),
            )));
        }
        // a "random" moment under load
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 600;
        tokio::time::sleep(Duration::from_millis(min_ms + jitter as u64)).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        for t in tasks {
            let _ = t.await;
        }
        spooled_at_kill += sendguard::spool::scan(&work.path("spool")).unwrap().len();
        segments = segments.max(newest_segment(&work.path("spool")));
        recycled_at_kill += std::fs::read_dir(work.path("spool").join("tmp"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("recycled-")
            })
            .count();
        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > 20,
            "round {round}: too little load before the kill ({})",
            acked.len()
        );
        total_acked.extend(acked);
    }

    // restart; everything acknowledged must arrive
    let mut child = spawn(&cfg);
    wait_port(addr).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (seen, missing) = loop {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in sink.messages() {
            if let Some(s) = m.body.lines().find_map(|l| l.strip_prefix("Subject: ")) {
                *seen.entry(s.to_string()).or_default() += 1;
            }
        }
        let missing: Vec<_> = total_acked.iter().filter(|s| !seen.contains_key(*s)).cloned().collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (seen, missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.start_kill().unwrap();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "kill -9 x3 ({body_len}-byte bodies): {} acknowledged, {spooled_at_kill} in the spool at the kills, all delivered; {duplicates} duplicates; {segments} segments, {recycled_at_kill} kept for reuse at the kills",
        total_acked.len()
    );
    // only transactions in flight at each kill may be repeated
    assert!(duplicates <= 3 * RELAY_CONNECTIONS, "{duplicates} duplicates");
    recycled_at_kill
}

/// The highest segment number in the spool (segments are numbered from 1).
fn newest_segment(spool: &std::path::Path) -> u64 {
    std::fs::read_dir(spool.join("seg"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name();
            u64::from_str_radix(name.to_string_lossy().split('.').next()?, 16).ok()
        })
        .max()
        .unwrap_or(0)
}
