//! deploy/ checked with real tools: systemd-analyze, systemd-sysusers/-tmpfiles
//! on a scratch root, hadolint and a small parser for the Containerfile (its
//! HEALTHCHECK run), kubernetes-validate (offline OpenAPI schemas), and
//! `sendguard check-config` on every config shipped. Tools: scripts/install-deps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const CONTAINERFILE: &str = "deploy/container/Containerfile";
const K8S: &str = "deploy/k8s";

/// Runs a command with arguments: (exit status 0, stdout + stderr).
macro_rules! run {
    ($cmd:expr $(, $arg:expr)* $(,)?) => {{
        let mut c: Command = $cmd;
        $(c.arg($arg);)*
        let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    }};
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A tool scripts/install-deps provides: from its Python venv, or on PATH.
fn tool(name: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let venv = root().join("target/tools/venv/bin");
    let mut dirs = std::iter::once(venv).chain(std::env::split_paths(&path));
    let dir = dirs.find(|d| d.join(name).is_file());
    let dir = dir.unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-deps"));
    Command::new(dir.join(name))
}

/// Writes `toml` to `dir`, its /etc/sendguard/{tls,redis}/ and
/// /var/lib/sendguard/ paths moved there (with a test certificate).
fn localize(toml: &str, dir: &Path) -> PathBuf {
    let pki = crate::support::pki();
    std::fs::write(dir.join("tls.crt"), &pki.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &pki.key_pem).unwrap();
    let mut text = toml.to_string();
    for from in ["/etc/sendguard/tls/", "/etc/sendguard/redis/", "/var/lib/sendguard/"] {
        text = text.replace(from, &format!("{}/", dir.display()));
    }
    std::fs::write(dir.join("c.toml"), text).unwrap();
    dir.join("c.toml")
}

fn check_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = Command::new(env!("CARGO_BIN_EXE_sendguard"));
    run!(bin, "check-config", "--config", localize(toml, dir.path()))
}

fn toml_str<'a>(v: &'a toml::Value, path: &str) -> &'a str {
    let get = |v: &'a toml::Value, k| v.get(k).unwrap_or_else(|| panic!("{path} missing"));
    path.split('.').fold(v, get).as_str().unwrap()
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<std::net::SocketAddr>().unwrap().port()
}

fn listener_ports(cfg: &toml::Value) -> Vec<u16> {
    let listeners = cfg["listeners"].as_array().unwrap();
    listeners.iter().map(|l| port_of(l["addr"].as_str().unwrap())).collect()
}

/// Lines the unit must have, as written (`;` separates lines here).
const UNIT_LINES: &str = "ExecStart=/usr/local/bin/sendguard serve --config /etc/sendguard/sendguard.toml
ExecStop=-/usr/local/bin/sendguard drain --config /etc/sendguard/sendguard.toml --wait 25s
ExecReload=/bin/kill -HUP $MAINPID;KillSignal=SIGTERM;TimeoutStopSec=60s;Restart=on-failure;LimitNOFILE=65536
User=sendguard;Group=sendguard;StateDirectory=sendguard;LogsDirectory=sendguard
ReadWritePaths=/var/lib/sendguard /var/log/sendguard;ProtectSystem=strict;ProtectHome=yes;PrivateTmp=yes
AmbientCapabilities=CAP_NET_BIND_SERVICE;CapabilityBoundingSet=CAP_NET_BIND_SERVICE;NoNewPrivileges=yes";

#[test]
fn deploy_systemd_unit_passes_systemd_analyze() {
    let unit = read("deploy/systemd/sendguard.service");
    for l in UNIT_LINES.lines().flat_map(|l| l.split(';')) {
        assert!(unit.lines().any(|u| u == l), "sendguard.service lacks {l}");
    }
    // TimeoutStopSec (per phase) outlasts the ExecStop drain and shutdown_grace.
    let grace = sendguard::config::ServerConfig::default().shutdown_grace;
    assert!(Duration::from_secs(60) > Duration::from_secs(25) + grace);
    // systemd-analyze checks that commands exist: point them at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sendguard.service");
    let analyze = |unit_text: &str, args: &[&str]| {
        let text = unit_text.replace("/usr/local/bin/sendguard", env!("CARGO_BIN_EXE_sendguard"));
        std::fs::write(&file, text).unwrap();
        let mut c = tool("systemd-analyze");
        c.args(args);
        run!(c, &file)
    };
    let (ok, said) = analyze(&unit, &["verify"]);
    assert!(ok && said.trim().is_empty(), "systemd-analyze verify: {said}");
    // It notices a misspelt directive (only as a warning: hence the empty output above).
    let (_, said) = analyze(&unit.replace("\nProtectHome=yes", "\nProtectHom=yes"), &["verify"]);
    assert!(said.contains("Unknown key 'ProtectHom'"), "{said}");
    // Exposure score (offline: no running systemd needed) at most 2.0 ("OK"),
    // and the threshold bites when hardening goes.
    let security = ["security", "--offline=yes", "--threshold=20"];
    let (ok, said) = analyze(&unit, &security);
    assert!(ok && said.contains("Overall exposure level"), "{said}");
    let weak = unit.replace("ProtectSystem=strict\n", "");
    assert!(!analyze(&weak.replace("SystemCallFilter=", "#"), &security).0);
    // sysusers.d and tmpfiles.d on a scratch root (as root: tmpfiles chowns):
    // a system user without a shell, owning its state directory.
    use std::os::unix::fs::MetadataExt;
    let (r, dir) = (tempfile::tempdir().unwrap(), root().join("deploy/systemd"));
    std::fs::create_dir(r.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", r.path().display());
    let (sysusers, tmpfiles) = (dir.join("sendguard.sysusers"), dir.join("sendguard.tmpfiles"));
    let (ok, said) = run!(tool("systemd-sysusers"), &root_arg, sysusers);
    let tmpfiles = run!(tool("systemd-tmpfiles"), &root_arg, "--create", tmpfiles);
    assert!(ok && tmpfiles.0, "{said}{}", tmpfiles.1);
    let passwd = std::fs::read_to_string(r.path().join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd.trim_end().split(':').collect(); // the only entry
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());
    let home_shell = ["/var/lib/sendguard", "/usr/sbin/nologin"];
    assert!(user[0] == "sendguard" && user[5..] == home_shell, "{passwd}");
    assert!(uid > 0 && uid < 1000, "a system user: {passwd}");
    let (state, conf) = (r.path().join("var/lib/sendguard"), r.path().join("etc/sendguard/tls"));
    let (state, conf) = (std::fs::metadata(state).unwrap(), std::fs::metadata(conf).unwrap());
    assert_eq!((state.uid(), state.gid(), state.mode() & 0o7777), (uid, gid, 0o750));
    assert_eq!((conf.uid(), conf.gid(), conf.mode() & 0o7777), (0, gid, 0o750));
}

/// A Containerfile's instructions as (stage, INSTRUCTION, arguments):
/// continuation lines joined, comments dropped, stage 0 from the first FROM.
fn instructions(cf: &str) -> Vec<(usize, String, String)> {
    let lines: Vec<&str> = cf.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let (mut stage, mut out) = (0, Vec::new());
    let joined = lines.join("\n").replace("\\\n", " ");
    for l in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (cmd, args) = l.split_once(' ').unwrap_or((l, ""));
        let cmd = cmd.to_ascii_uppercase();
        stage += usize::from(cmd == "FROM" && !out.is_empty());
        out.push((stage, cmd, args.trim().to_string()));
    }
    out
}

/// Arguments of every `cmd` in `stage`.
fn all<'a>(ins: &'a [(usize, String, String)], stage: usize, cmd: &'a str) -> impl Iterator<Item = &'a str> {
    let matching = ins.iter().filter(move |i| i.0 == stage && i.1 == cmd);
    matching.map(|i| i.2.as_str())
}

/// The `--from=` option of an instruction and its other words (a JSON
/// array form parsed as such).
fn words(args: &str) -> (Option<&str>, Vec<String>) {
    let n = args.split_whitespace().take_while(|w| w.starts_with("--")).count();
    let from = args.split_whitespace().take(n).find_map(|f| f.strip_prefix("--from="));
    let rest = args.split_whitespace().skip(n).collect::<Vec<_>>().join(" ");
    let split = || rest.split_whitespace().map(str::to_string).collect();
    (from, serde_json::from_str(&rest).unwrap_or_else(|_| split()))
}

/// A .dockerignore `!allowed` entry lets `src` into the build context.
fn covers(allowed: &str, src: &str) -> bool {
    src == allowed.trim_end_matches('/') || src.starts_with(allowed)
}

/// What is wrong with a Containerfile for this repository (empty: nothing).
fn containerfile_problems(cf: &str, dockerignore: &str) -> Vec<String> {
    let (ins, mut problems) = (instructions(cf), Vec::new());
    let last = ins.last().map_or(0, |i| i.0);
    let name = |s| all(&ins, s, "FROM").next()?.split(" AS ").nth(1);
    let names: Vec<Option<&str>> = (0..=last).map(name).collect();
    // .dockerignore: `*`, then `!path` allow-list entries.
    let allowed: Vec<&str> = dockerignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    for (stage, _, args) in ins.iter().filter(|i| i.1 == "COPY" || i.1 == "ADD") {
        let (from, ws) = words(args);
        if let Some(from) = from {
            if !names[..*stage].contains(&Some(from)) {
                problems.push(format!("COPY --from={from}: no stage of that name before it"));
            }
            continue;
        }
        for src in &ws[..ws.len().saturating_sub(1)] {
            let src = src.trim_start_matches("./").trim_end_matches('/');
            if !root().join(src).exists() {
                problems.push(format!("COPY {src}: not in the repository"));
            } else if !allowed.iter().any(|a| covers(a, src)) {
                problems.push(format!("COPY {src}: excluded by .dockerignore"));
            }
        }
    }
    let user = all(&ins, last, "USER").last().unwrap_or("root");
    if user.split(':').next().unwrap().parse::<u32>().unwrap_or(0) == 0 {
        problems.push(format!("final stage: USER {user}: not a numeric non-root uid"));
    }
    if !all(&ins, last, "VOLUME").any(|v| words(v).1.contains(&"/var/lib/sendguard".to_string())) {
        problems.push("final stage: VOLUME /var/lib/sendguard (the spool) missing".into());
    }
    problems
}

fn healthcheck_cmd(cf: &str) -> Vec<String> {
    let ins = instructions(cf);
    let h = &ins.iter().find(|i| i.1 == "HEALTHCHECK").expect("HEALTHCHECK").2;
    serde_json::from_str(&h[h.find("CMD ").unwrap() + 4..]).unwrap()
}

#[test]
fn deploy_containerfile_builds_from_the_repository() {
    let (cf, ignore) = (read(CONTAINERFILE), read(".dockerignore"));
    assert_eq!(containerfile_problems(&cf, &ignore), Vec::<String>::new());
    // The checker finds what it is there for.
    for (from, to, expect) in [
        ("COPY --from=build ", "COPY --from=builder ", "no stage"),
        ("COPY benches ./", "COPY bench ./", "not in the repository"),
        ("USER 10001:10001", "USER root", "USER"),
    ] {
        assert!(cf.contains(from), "{from}");
        let p = containerfile_problems(&cf.replace(from, to), &ignore);
        assert!(p.iter().any(|m| m.contains(expect)), "{to}: {p:?}");
    }
    let p = containerfile_problems(&cf, &ignore.replace("!benches/\n", ""));
    assert_eq!(p, ["COPY benches: excluded by .dockerignore"]);
    // hadolint: clean, and not blind (DL3022: --from names no stage).
    let dir = tempfile::tempdir().unwrap();
    let lint = |text: &str| {
        std::fs::write(dir.path().join("Containerfile"), text).unwrap();
        run!(tool("hadolint"), dir.path().join("Containerfile"))
    };
    let (ok, said) = lint(&cf);
    assert!(ok, "hadolint: {said}");
    let (ok, said) = lint(&cf.replace("COPY --from=build ", "COPY --from=builder "));
    assert!(!ok && said.contains("DL3022"), "{said}");
    let ins = instructions(&cf);
    let last = ins.last().unwrap().0;
    let images: Vec<&str> = (0..=last).filter_map(|s| all(&ins, s, "FROM").next()).collect();
    let want = ["rust:1.95-slim-bookworm AS build", "debian:bookworm-slim AS runtime"];
    assert_eq!(images, want);
    assert!(all(&ins, 0, "RUN").any(|r| r.contains("cargo build --release --locked")));
    // The build stage's context is enough for cargo to read the manifest
    // (every target it declares must exist) and the lock file (--locked).
    let ctx = tempfile::tempdir().unwrap();
    let mut cp = Command::new("cp");
    cp.arg("-r").current_dir(root());
    for copy in all(&ins, 0, "COPY") {
        cp.args(words(copy).1.split_last().unwrap().1);
    }
    assert!(run!(cp, ctx.path()).0);
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(ctx.path());
    let (ok, said) = run!(cargo, "fetch", "--locked", "--offline");
    assert!(ok, "cargo with the image's build context: {said}");
    // The config the image ships is valid, served by CMD, and matches
    // EXPOSE and the HEALTHCHECK's port.
    let copies: Vec<Vec<String>> = all(&ins, last, "COPY").map(|c| words(c).1).collect();
    let copy = copies.iter().find(|w| w[1].ends_with(".toml")).unwrap();
    let config = read(&copy[0]);
    let (ok, said) = check_config(&config);
    assert!(ok, "{}: {said}", copy[0]);
    let cmd: Vec<String> = serde_json::from_str(all(&ins, last, "CMD").last().unwrap()).unwrap();
    assert_eq!(cmd, ["serve", "--config", &copy[1]]);
    let cfg: toml::Value = config.parse().unwrap();
    let mut ports: BTreeSet<u16> = listener_ports(&cfg).into_iter().collect();
    assert!(ports.iter().all(|p| *p >= 1024), "uid 10001 cannot bind {ports:?}");
    let admin = port_of(toml_str(&cfg, "admin.addr"));
    ports.insert(admin);
    let expose = all(&ins, last, "EXPOSE").flat_map(str::split_whitespace);
    assert_eq!(expose.map(|p| p.parse().unwrap()).collect::<BTreeSet<u16>>(), ports);
    // The HEALTHCHECK (run against a real node below) asks that port.
    let probe = healthcheck_cmd(&cf);
    assert!(probe.join(" ").contains(&format!("/dev/tcp/127.0.0.1/{admin} ")) && Path::new(&probe[0]).is_file());
}

/// The manifests (kustomization.yaml is kustomize's, not an API object).
fn manifests() -> Vec<PathBuf> {
    let dir = std::fs::read_dir(root().join(K8S)).unwrap().map(|e| e.unwrap().path());
    let mut v: Vec<PathBuf> = dir.filter(|p| p.extension().is_some_and(|x| x == "yaml")).collect();
    v.retain(|p| !p.ends_with("kustomization.yaml"));
    v.sort();
    v
}

/// kubernetes-validate --strict (unknown fields are errors); a resource
/// without a schema (a misspelt kind) only warns there, so it fails here.
fn validate(file: &Path) -> Result<usize, String> {
    let (ok, said) = run!(tool("kubernetes-validate"), "--strict", file);
    let passed = said.lines().filter(|l| l.contains(" passed for resource ")).count();
    let clean = ok && passed > 0 && said.lines().all(|l| l.starts_with("INFO"));
    if clean { Ok(passed) } else { Err(said) }
}

/// Every YAML document in `file`, as JSON (PyYAML from the tools venv).
fn yaml_docs(file: &Path) -> Vec<Value> {
    let py = "import json,sys,yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let (ok, said) = run!(tool("python3"), "-c", py, file);
    assert!(ok, "{file:?} (PyYAML: run scripts/install-deps): {said}");
    serde_json::from_str(&said).unwrap()
}

#[test]
fn deploy_k8s_manifests_match_the_kubernetes_schemas() {
    for f in manifests() {
        validate(&f).unwrap_or_else(|e| panic!("{f:?}: {e}"));
    }
    // The validator is not blind: a wrong type, an unknown field, an unknown kind.
    let sts = read(&format!("{K8S}/statefulset.yaml"));
    let dir = tempfile::tempdir().unwrap();
    for (from, to, expect) in [
        ("replicas: 3", "replicas: \"three\"", "is not of type"),
        ("enableServiceLinks:", "enableServiceLink:", "was unexpected"),
        ("kind: StatefulSet", "kind: StatefulSett", "Couldn't find schema"),
    ] {
        assert!(sts.contains(from));
        std::fs::write(dir.path().join("bad.yaml"), sts.replace(from, to)).unwrap();
        let e = validate(&dir.path().join("bad.yaml")).expect_err(to);
        assert!(e.contains(expect), "{to}: {e}");
    }
    // kustomization.yaml lists every manifest but the *.example.yaml Secret templates.
    let k = &yaml_docs(&root().join(K8S).join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = serde_json::from_value(k["resources"].clone()).unwrap();
    let name = |p: PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    let names = manifests().into_iter().map(name);
    assert_eq!(listed, names.filter(|f| !f.ends_with(".example.yaml")).collect());
    // kubectl is optional; where it exists, what kustomize renders validates too.
    if let Ok(out) = Command::new("kubectl").arg("kustomize").arg(root().join(K8S)).output() {
        assert!(out.status.success(), "kubectl kustomize: {out:?}");
        std::fs::write(dir.path().join("rendered.yaml"), &out.stdout).unwrap();
        assert_eq!(validate(&dir.path().join("rendered.yaml")), Ok(listed.len()));
    }
}

/// Values the manifests must have: object, JSON pointer, JSON value.
const K8S_EXPECT: &str = r#"
StatefulSet/sendguard /spec/replicas 3
StatefulSet/sendguard /spec/podManagementPolicy "Parallel"
StatefulSet/sendguard /spec/serviceName "sendguard-headless"
StatefulSet/sendguard /spec/selector/matchLabels {"app.kubernetes.io/name": "sendguard"}
StatefulSet/sendguard /spec/template/metadata/labels {"app.kubernetes.io/name": "sendguard"}
StatefulSet/sendguard /spec/volumeClaimTemplates/0/metadata/name "spool"
StatefulSet/sendguard /spec/template/spec/securityContext/runAsNonRoot true
StatefulSet/sendguard /spec/template/spec/securityContext/runAsUser 10001
StatefulSet/sendguard /spec/template/spec/terminationGracePeriodSeconds 70
StatefulSet/sendguard /spec/template/spec/containers/0/args ["serve", "--config", "/run/sendguard/sendguard.toml"]
StatefulSet/sendguard /spec/template/spec/containers/0/lifecycle/preStop/exec/command ["/usr/local/bin/sendguard", "drain", "--config", "/run/sendguard/sendguard.toml", "--wait", "25s"]
StatefulSet/sendguard /spec/template/spec/containers/0/readinessProbe/httpGet {"path": "/readyz", "port": "admin"}
StatefulSet/sendguard /spec/template/spec/containers/0/livenessProbe/httpGet {"path": "/healthz", "port": "admin"}
StatefulSet/sendguard /spec/template/spec/containers/0/startupProbe/httpGet {"path": "/healthz", "port": "admin"}
StatefulSet/sendguard /spec/template/spec/containers/0/env/0/name "POD_NAME"
StatefulSet/sendguard /spec/template/spec/containers/0/env/0/valueFrom/fieldRef/fieldPath "metadata.name"
StatefulSet/sendguard /spec/template/spec/containers/0/ports [{"name": "submission", "containerPort": 2587}, {"name": "submissions", "containerPort": 2465}, {"name": "admin", "containerPort": 8025}]
StatefulSet/sendguard /spec/template/spec/containers/0/volumeMounts/3 {"name": "rendered", "mountPath": "/run/sendguard", "readOnly": true}
StatefulSet/sendguard /spec/template/spec/containers/0/volumeMounts/4 {"name": "spool", "mountPath": "/var/lib/sendguard"}
StatefulSet/sendguard /spec/template/spec/containers/0/securityContext {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}
StatefulSet/sendguard /spec/template/spec/initContainers/0/securityContext {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}
StatefulSet/sendguard /spec/template/spec/volumes/0/configMap/name "sendguard-config"
StatefulSet/sendguard /spec/template/spec/volumes/1/secret/secretName "sendguard-credentials"
StatefulSet/sendguard /spec/template/spec/volumes/2/secret/secretName "sendguard-tls"
StatefulSet/sendguard /spec/template/spec/volumes/4/secret {"secretName": "sendguard-redis", "items": [{"key": "redis-password", "path": "password"}]}
Service/sendguard-headless /spec/clusterIP "None"
Service/sendguard-headless /spec/selector {"app.kubernetes.io/name": "sendguard"}
Service/sendguard-smtp /spec/selector {"app.kubernetes.io/name": "sendguard"}
Service/sendguard-smtp /spec/externalTrafficPolicy "Local"
Service/sendguard-smtp /spec/ports/0 {"name": "submission", "port": 587, "targetPort": "submission", "protocol": "TCP"}
Service/sendguard-smtp /spec/ports/1 {"name": "submissions", "port": 465, "targetPort": "submissions", "protocol": "TCP"}
Service/sendguard-admin /spec/type "ClusterIP"
Service/sendguard-admin /spec/selector {"app.kubernetes.io/name": "sendguard"}
Service/sendguard-admin /spec/ports/0/targetPort "admin"
PodDisruptionBudget/sendguard /spec/maxUnavailable 1
PodDisruptionBudget/sendguard /spec/selector/matchLabels {"app.kubernetes.io/name": "sendguard"}
Secret/sendguard-tls /type "kubernetes.io/tls"
Secret/sendguard-tls /stringData {"tls.crt": "REPLACE_ME", "tls.key": "REPLACE_ME"}
Secret/sendguard-credentials /type "Opaque"
"#;

#[test]
fn deploy_k8s_pod_config_serves_probes_and_drains() {
    let mut obj: BTreeMap<String, Value> = BTreeMap::new();
    for d in manifests().iter().flat_map(|f| yaml_docs(f)) {
        let key = format!("{}/{}", d["kind"], d["metadata"]["name"]).replace('"', "");
        obj.insert(key, d);
    }
    for l in K8S_EXPECT.lines().filter(|l| !l.is_empty()) {
        let mut w = l.splitn(3, ' ');
        let (o, ptr, want) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
        let o = obj.get(o).unwrap_or_else(|| panic!("{o} missing: {:?}", obj.keys()));
        let want: Value = serde_json::from_str(want).unwrap();
        assert_eq!(o.pointer(ptr), Some(&want), "{l}");
    }
    let text = |o: &str, ptr: &str| obj[o].pointer(ptr).and_then(Value::as_str).unwrap().to_string();
    // The config the pod runs: the ConfigMap's sendguard.toml + the Secret's
    // credentials.toml, concatenated and checked by the init container.
    let base = text("ConfigMap/sendguard-config", "/data/sendguard.toml");
    let creds = text("Secret/sendguard-credentials", "/stringData/credentials.toml");
    let init = text("StatefulSet/sendguard", "/spec/template/spec/initContainers/0/args/0");
    let cat = "cat /etc/sendguard/base/sendguard.toml /etc/sendguard/credentials/credentials.toml";
    let check = "check-config --config /run/sendguard/sendguard.toml";
    assert!(init.contains(cat) && init.contains(check), "{init}");
    let config = format!("{base}{creds}");
    // Placeholders left in are refused: the hash (not a PHC string), then
    // the token (too short) ...
    let hash = format!("password_hash = \"{}\"", crate::support::password_hash());
    let (ok, said) = check_config(&config);
    assert!(!ok && said.contains("password_hash"), "{said}");
    let (ok, said) = check_config(&config.replace("password_hash = \"REPLACE_ME\"", &hash));
    assert!(!ok && said.contains("admin.token"), "{said}");
    // ... and the template is valid once they are filled in.
    let fill = |l: &str| match l.split_once(" = \"REPLACE_ME\"") {
        Some(("token", _)) => "token = \"0123456789abcdef0123456789abcdef\"".to_string(),
        Some(("password_hash", _)) => hash.clone(),
        Some((key, _)) => format!("{key} = \"filled-in\""),
        None => l.to_string(),
    };
    let filled = config.lines().map(fill).collect::<Vec<_>>().join("\n");
    let (ok, said) = check_config(&filled);
    assert!(ok && !filled.contains("REPLACE_ME"), "{said}");
    let cfg: toml::Value = filled.parse().unwrap();
    // The container ports (K8S_EXPECT) are the config's.
    assert_eq!(listener_ports(&cfg), [2587, 2465]);
    assert_eq!(port_of(toml_str(&cfg, "admin.addr")), 8025);
    // Every path sendguard writes is on the spool claim (read-only root).
    for key in ["spool.dir", "events.path"] {
        assert!(toml_str(&cfg, key).starts_with("/var/lib/sendguard/"), "{key}");
    }
    // preStop (K8S_EXPECT) drains the node; the pod's grace period covers
    // that drain (--wait 25s) plus shutdown_grace after SIGTERM (70s).
    let grace = humantime::parse_duration(toml_str(&cfg, "server.shutdown_grace")).unwrap();
    assert!(Duration::from_secs(70) > Duration::from_secs(25) + grace);
    // Runs as the uid the image runs as (K8S_EXPECT: runAsUser).
    assert!(read(CONTAINERFILE).contains("\nUSER 10001:10001\n"));
    assert_eq!(toml_str(&cfg, "cluster.password_file"), "/etc/sendguard/redis/password");
    let pre_stop = "/spec/template/spec/containers/0/lifecycle/preStop/exec/command";
    let pre_stop: serde_json::Result<Vec<String>> =
        serde_json::from_value(obj["StatefulSet/sendguard"].pointer(pre_stop).unwrap().clone());
    serve_and_drain(&filled, &pre_stop.unwrap());
}

/// Kills a child process when dropped (a failed assertion leaves nothing running).
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pod's config served on loopback with a Redis: ready once Redis
/// answers, drained by the preStop command, ended by SIGTERM.
fn serve_and_drain(config: &str, pre_stop: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let [admin, redis, smtp, smtps] = [(); 4].map(|_| crate::support::sink::free_port());
    let local = |port| format!("127.0.0.1:{port}");
    let config = config.replace("0.0.0.0:2587", &local(smtp));
    let config = config.replace("0.0.0.0:2465", &local(smtps));
    let config = config.replace("sendguard-redis-master:6379", &local(redis));
    let config = config.replace("0.0.0.0:8025", &format!("0.0.0.0:{admin}"));
    std::fs::write(dir.path().join("password"), "pw\n").unwrap();
    let mut r = tool("redis-server");
    r.args(["--bind", "127.0.0.1", "--requirepass", "pw", "--save", ""]);
    r.args(["--port", &redis.to_string()]);
    let _redis = Proc(r.stdout(Stdio::null()).spawn().unwrap());
    let f = localize(&config, dir.path());
    let mut node = Command::new(env!("CARGO_BIN_EXE_sendguard"));
    node.args(["serve", "--config"]).arg(&f).stderr(Stdio::null());
    let mut node = Proc(node.spawn().unwrap());
    let healthcheck = healthcheck_cmd(&read(CONTAINERFILE));
    let probe = |path: &str| {
        let arg = |a: &String| a.replace("/8025", &format!("/{admin}")).replace("/healthz", path);
        let mut c = Command::new(&healthcheck[0]);
        c.args(healthcheck[1..].iter().map(arg));
        run!(c).0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe("/readyz") {
        assert!(Instant::now() < deadline, "not ready after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut drain = Command::new(env!("CARGO_BIN_EXE_sendguard"));
    let arg = |a: &String| a.replace("/run/sendguard/sendguard.toml", f.to_str().unwrap());
    drain.args(pre_stop[1..].iter().map(arg));
    let (ok, said) = run!(drain);
    // Draining: not ready, still alive (as the image's HEALTHCHECK sees it).
    assert!(ok && !probe("/readyz") && probe("/healthz"), "preStop: {said}");
    assert_eq!(unsafe { libc::kill(node.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(node.0.wait().unwrap().success() && !probe("/healthz"));
}
