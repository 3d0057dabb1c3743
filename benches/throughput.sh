#!/usr/bin/env bash
# End-to-end throughput, in one run, on this machine:
#   (a) the load tool straight into smtp-sink (the physical limit),
#   (b) through sendguard (durable spool, relay to the same smtp-sink),
#       over the trusted plain listener and over STARTTLS + AUTH,
#   (c) with --postfix: through a private Postfix instance relaying to the sink,
#   (d) with --cluster: sendguard again in fleet mode ([cluster] on a private
#       redis-server), both sendguard runs with the same provider rate
#       (20,000/s: above what this machine reaches, so it never binds but
#       every message needs a token: local GCRA vs leases from Redis); prints
#       Redis commands per message,
#   (e) with --relay-floor: through HAProxy as a plain TCP relay to the same
#       sink (no SMTP parsing, no disk: what any proxy in the path costs on
#       this machine, a reference for (b)).
# "End to end" = until the sink has counted every message.
# The machine's speed drifts by ±30% over a minute (a shared 2-core VM), so
# one run of each is not a fair comparison: (a), (b), (c) and (e) run in R
# interleaved rounds (--rounds, default 3) and the ratios are taken within
# each round, then summarized as the median and the range.
#
# usage: benches/throughput.sh [--messages N] [--size BYTES] [--sessions S] [--rounds R] [--postfix] [--cluster] [--relay-floor]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

N=20000; SIZE=2048; SESSIONS=20; ROUNDS=3; POSTFIX=0; CLUSTER=0; FLOOR=0
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) N=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --postfix) POSTFIX=1; shift ;;
    --cluster) CLUSTER=1; shift ;;
    --relay-floor) FLOOR=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
check_rounds "$ROUNDS"
if [ "$FLOOR" = 1 ] && ! command -v haproxy >/dev/null; then
  echo "--relay-floor needs haproxy (scripts/install-deps installs it)" >&2
  exit 2
fi

cargo build --release --quiet --bins --benches
LOAD=(cargo bench --quiet --bench smtp_load --)
WORK=$(mktemp -d /tmp/sendguard-bench.XXXXXX)
chmod 755 "$WORK"   # Postfix daemons run unprivileged
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -f "$WORK/postfix/conf/main.cf" ]; then postfix -c "$WORK/postfix/conf" stop >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

start_sink
SINK_PID=${PIDS[-1]}

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "load: $N messages of ~$SIZE bytes over $SESSIONS sessions, $ROUNDS interleaved rounds"

run() { "${LOAD[@]}" --messages "$N" --size "$SIZE" --sessions "$SESSIONS" --sink-counter "$WORK/sink.out" "$@"; }

# sendguard: trusted plain listener + STARTTLS/AUTH listener, spool on local disk
P_PLAIN=$(port); P_TLS=$(port)
HASH=$(printf 'bench-password' | target/release/sendguard hash-password)
cat > "$WORK/sendguard.toml" <<TOML
[server]
hostname = "bench.local"
[log]
level = "warn"
[tls]
cert = "$PWD/config/dev/cert.pem"
key = "$PWD/config/dev/key.pem"
[[listeners]]
addr = "127.0.0.1:$P_PLAIN"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
tenant = "bench"
[[listeners]]
addr = "127.0.0.1:$P_TLS"
tls = "starttls"
auth = "required"
[limits]
max_message_bytes = 104857600
[[tenants]]
name = "bench"
sender_domains = ["local.example"]
guard = "off"  # measures the proxy, not DNS
[[tenants.users]]
username = "bench"
password_hash = "$HASH"
[spool]
dir = "$WORK/spool"
[relay]
addr = "127.0.0.1:$SINK"
tls = "none"
max_connections = 20
[events]
path = "$WORK/events.jsonl"
[shaping]
group_by_mx = false  # measures the proxy, not DNS (benches/shaping.rs measures shaping)
TOML
if [ "$CLUSTER" = 1 ]; then
  printf '[[shaping.provider]]\nname = "other"\nrate = "20000/s"\nburst = 100\n' >> "$WORK/sendguard.toml"
fi
target/release/sendguard serve --config "$WORK/sendguard.toml" 2> "$WORK/sendguard.log" &
SG=$!
PIDS+=($SG)
wait_port "$P_PLAIN"

# CPU time of a process so far, in clock ticks: user + system, and system.
cpu_ticks() { awk '{print $14+$15, $15}' /proc/"$1"/stat; }
TICKS=$(getconf CLK_TCK)
# Run a labelled load; add the CPU time per message of smtp-sink, of the
# proxy in the path ($1 = sg: sendguard, relay: the TCP relay, -: none;
# total and system part) and the machine's idle share to its JSON line (the
# load tool reports its own CPU time).
measured() {
  local who=$1 pid=0 s0 s1 g0="0 0" g1="0 0" i0 i1 out
  shift
  case "$who" in sg) pid=$SG ;; relay) pid=$RELAY ;; esac
  s0=$(cpu_ticks "$SINK_PID"); i0=$(head -1 /proc/stat)
  [ "$pid" != 0 ] && g0=$(cpu_ticks "$pid")
  out=$(run "$@")
  s1=$(cpu_ticks "$SINK_PID"); i1=$(head -1 /proc/stat)
  [ "$pid" != 0 ] && g1=$(cpu_ticks "$pid")
  python3 - "$out" "$who" "$s0" "$s1" "$g0" "$g1" "$TICKS" "$i0" "$i1" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); who = sys.argv[2]
(s0, _), (s1, _), (g0, k0), (g1, k1) = ([int(x) for x in v.split()] for v in sys.argv[3:7])
hz = int(sys.argv[7])
a = [int(x) for x in sys.argv[8].split()[1:]]; b = [int(x) for x in sys.argv[9].split()[1:]]
per = lambda t: round(t / hz * 1e6 / max(d["messages"], 1), 1)
d["sink_cpu_us_per_msg"] = per(s1 - s0)
if who != "-":
    name = {"sg": "sendguard", "relay": "relay"}[who]
    d[f"{name}_cpu_us_per_msg"] = per(g1 - g0)
    d[f"{name}_sys_us_per_msg"] = per(k1 - k0)
tot = sum(b[:8]) - sum(a[:8])
d["idle_pct"] = round(100 * ((b[3] + b[4]) - (a[3] + a[4])) / max(tot, 1), 1)
print(json.dumps(d))
PY
}
rss() { echo "{\"label\":\"sendguard-rss-$1\",\"max_rss_kib\":$(awk '/VmHWM/{print $2}' /proc/$SG/status),\"rss_kib\":$(awk '/VmRSS/{print $2}' /proc/$SG/status)}"; }

if [ "$POSTFIX" = 1 ]; then
  P_PF=$(port)
  PF="$WORK/postfix"
  mkdir -p "$PF/conf" "$PF/queue" "$PF/data"
  chown postfix "$PF/data" 2>/dev/null || true
  cp /etc/postfix/master.cf "$PF/conf/master.cf"
  # listen on our port, no chroot
  sed -i -E "s/^smtp( +)inet( +)n( +)-( +)y/127.0.0.1:$P_PF inet n - n/; s/^([a-z]+ +[a-z]+ +[-n] +[-n] +)y /\1n /" "$PF/conf/master.cf"
  cat > "$PF/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
myhostname = postfix-bench.local
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relayhost = [127.0.0.1]:$SINK
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
default_destination_concurrency_limit = 20
smtp_connection_cache_on_demand = yes
CF
  postfix -c "$PF/conf" start >/dev/null 2>&1
  wait_port "$P_PF"
fi

if [ "$FLOOR" = 1 ]; then
  # HAProxy in TCP mode on both cores: it copies bytes between the load
  # tool and the sink and does nothing else.
  P_RELAY=$(port)
  cat > "$WORK/haproxy.cfg" <<CFG
global
  nbthread $(nproc)
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen relay
  bind 127.0.0.1:$P_RELAY
  server sink 127.0.0.1:$SINK
CFG
  haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
  RELAY=$!
  PIDS+=($RELAY)
  wait_port "$P_RELAY"
fi

# Interleaved rounds: every round runs each path once, back to back, so a
# ratio compares runs made within seconds of each other.
RESULTS="$WORK/results.jsonl"
tagged() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$1" "$2"; }
for r in $(seq 1 "$ROUNDS"); do
  tagged "$(measured - --addr 127.0.0.1:"$SINK" --label direct-to-sink)" "$r" | tee -a "$RESULTS"
  tagged "$(measured sg --addr 127.0.0.1:"$P_PLAIN" --label sendguard-plain)" "$r" | tee -a "$RESULTS"
  tagged "$(measured sg --addr 127.0.0.1:"$P_TLS" --starttls --auth bench:bench-password --label sendguard-starttls-auth)" "$r" | tee -a "$RESULTS"
  if [ "$POSTFIX" = 1 ]; then
    tagged "$(measured - --addr 127.0.0.1:"$P_PF" --label postfix-relay --timeout 900)" "$r" | tee -a "$RESULTS"
  fi
  if [ "$FLOOR" = 1 ]; then
    tagged "$(measured relay --addr 127.0.0.1:"$P_RELAY" --label tcp-relay)" "$r" | tee -a "$RESULTS"
  fi
done
rss after-rounds

if [ "$CLUSTER" = 1 ]; then
  kill "$SG"; wait "$SG" 2>/dev/null || true
  P_REDIS=$(port)
  redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no > "$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$P_REDIS"
  printf '[cluster]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s/"\nnode_id = "bench"\n' "$P_REDIS" >> "$WORK/sendguard.toml"
  rm -rf "$WORK/spool" "$WORK/events.jsonl"
  target/release/sendguard serve --config "$WORK/sendguard.toml" 2> "$WORK/sendguard-cluster.log" &
  SG=$!
  PIDS+=($SG)
  wait_port "$P_PLAIN"
  for _ in $(seq 1 100); do redis-cli -p "$P_REDIS" zcard sendguard:nodes | grep -q 1 && break; sleep 0.05; done
  calls() { redis-cli -p "$P_REDIS" info commandstats | awk -F'[=,:]' '/^cmdstat_/{s+=$3} END{print s}'; }
  C0=$(calls)
  SG_CLUSTER=$(measured sg --addr 127.0.0.1:"$P_PLAIN" --label sendguard-plain-cluster)
  C1=$(calls)
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["redis_commands_per_msg"]=round((int(sys.argv[3])-int(sys.argv[2]))/d["messages"],3); print(json.dumps(d))' "$SG_CLUSTER" "$C0" "$C1"
  rss after-plain-cluster
fi

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds = sorted({r["round"] for r in rows})
rate = {(r["round"], r["label"]): r["msg_per_s"] for r in rows}
def summary(name, num, den, fmt):
    vals = [rate[(k, num)] / rate[(k, den)] for k in rounds if (k, num) in rate and rate.get((k, den))]
    if not vals:
        return
    each = ", ".join(fmt.format(v) for v in vals)
    print(f"{name:34} = {fmt.format(statistics.median(vals))} median of {len(vals)} rounds ({each})")
for label in ("direct-to-sink", "sendguard-plain", "sendguard-starttls-auth", "postfix-relay", "tcp-relay"):
    v = [rate[(k, label)] for k in rounds if (k, label) in rate]
    if v:
        print(f"{label:34} : median {statistics.median(v):.0f} msg/s, range {min(v)}-{max(v)}")
summary("sendguard plain / direct", "sendguard-plain", "direct-to-sink", "{:.2f}")
summary("sendguard starttls+auth / direct", "sendguard-starttls-auth", "direct-to-sink", "{:.2f}")
summary("sendguard plain / postfix", "sendguard-plain", "postfix-relay", "{:.1f}x")
summary("sendguard starttls+auth / postfix", "sendguard-starttls-auth", "postfix-relay", "{:.1f}x")
summary("tcp relay / direct", "tcp-relay", "direct-to-sink", "{:.2f}")
# Where the CPU goes: everything shares the same cores, so when direct and
# proxied runs leave the same idle share, plain / direct is about
# (load + sink) / (load + sink + sendguard) per message; 0.50 needs
# sendguard to spend no more CPU per message than the load tool and the
# sink together.
cpu = lambda label, key: [r[key] for r in rows if r["label"] == label and r.get(key) is not None]
d_ls = [a + b for a, b in zip(cpu("direct-to-sink", "load_cpu_us_per_msg"), cpu("direct-to-sink", "sink_cpu_us_per_msg"))]
sg = cpu("sendguard-plain", "sendguard_cpu_us_per_msg")
sg_sys = cpu("sendguard-plain", "sendguard_sys_us_per_msg")
if d_ls and sg:
    ls, p = statistics.median(d_ls), statistics.median(sg)
    print(f"CPU per message (median): load tool + sink {ls:.0f} us (direct), sendguard plain {p:.0f} us"
          f" (system {statistics.median(sg_sys):.0f} us) = {p / ls:.2f}x load + sink (0.50x direct needs <= 1.00x)")
relay, relay_sys = cpu("tcp-relay", "relay_cpu_us_per_msg"), cpu("tcp-relay", "relay_sys_us_per_msg")
if relay:
    print(f"CPU per message (median): tcp relay {statistics.median(relay):.0f} us (system {statistics.median(relay_sys):.0f} us)")
PY
