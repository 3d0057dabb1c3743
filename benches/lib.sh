# Helpers shared by the benchmark scripts (sourced, not run).

# Exit 2 unless $1 (the value of --rounds) is a whole number >= 1.
check_rounds() {
  [[ "$1" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a whole number >= 1, got '$1'" >&2; exit 2; }
}

# A free loopback TCP port.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Wait until something listens on 127.0.0.1:$1 (10 s at most).
wait_port() {
  for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2
  exit 1
}

# smtp-sink refuses to run as root without -u.
USER_OPT=(); [ "$(id -u)" = 0 ] && USER_OPT=(-u root)

# sendguard config for benchmarks: one trusted plain listener on port $2
# (tenant "bench", guard off: measures the proxy, not DNS), spool and
# events in $1, relay to $3; $4 = extra lines for [relay]. Callers append
# further tables.
plain_config() {
  cat <<TOML
[server]
hostname = "bench.local"
[log]
level = "warn"
[[listeners]]
addr = "127.0.0.1:$2"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
tenant = "bench"
[limits]
max_message_bytes = 104857600
[[tenants]]
name = "bench"
sender_domains = ["local.example"]
guard = "off"
[spool]
dir = "$1/spool"
[events]
path = "$1/events.jsonl"
[shaping]
group_by_mx = false  # measures the proxy, not DNS (benches/shaping.rs measures shaping)
[relay]
addr = "$3"
tls = "none"
${4:-}
TOML
}

# Start smtp-sink on a free port (SINK), counting into $WORK/sink.out; its
# pid is added to PIDS for the caller's cleanup.
start_sink() {
  SINK=$(port)
  smtp-sink "${USER_OPT[@]}" -c 127.0.0.1:"$SINK" 1024 > "$WORK/sink.out" 2>&1 &
  PIDS+=($!)
  wait_port "$SINK"
}
