#!/usr/bin/python3
"""RFC 7208 SPF test suite (python3-spf's rfc7208-tests.yml.gz) -> unbound data.

Usage: rfc7208_to_unbound.py OUTDIR [SRC]

For each YAML document N (0-based) writes into OUTDIR:
  docNN.conf  unbound `server:` lines (local-zone / local-data only, indented
              4 spaces; tests/it/support/dns.rs supplies the header, the port
              and `local-zone: "." static`, under which listed names answer,
              listed names without the asked type are NODATA and everything
              else is NXDOMAIN)
  docNN.tsv   one line per test: name, host (client IP), helo, mailfrom,
              acceptable results (comma-separated, lower case)
and index.tsv: NN, number of tests, description.

Mapping of the suite's zonedata (adapted from docs/notes/guard-research.md §5.2):
  SPF     -> a TXT record, unless the name also lists TXT (pyspf's rule: SPF
             records are duplicated to TXT only when there is no TXT entry;
             `TXT: NONE` is such an entry). Type-99 SPF itself is not served.
  TXT     -> TXT (a list of strings is one RR with several character-strings)
  A/AAAA/MX/PTR/CNAME -> as is
  TIMEOUT -> `local-zone: "<name>." deny`: the listed records still answer,
             every other query for the name (and below it) is dropped, so the
             client times out, which is what pyspf's test driver does.
             Listed names below a TIMEOUT name get their own `static` zone.
Bytes outside printable ASCII (and spaces, quotes, backslashes, semicolons)
become \\DDD escapes, in TXT data and in owner names; owner names DNS cannot
carry (labels > 63 octets) are skipped: a query for them can never reach a
server anyway.
"""
import gzip
import os
import string
import sys

import yaml

SRC = "/usr/share/doc/python3-spf/rfc7208-tests.yml.gz"

# Declared by TestDns's base config; declaring them again makes unbound refuse
# the config ("duplicate local-zone").
BASE_ZONES = {".", "servfail.test.", "timeout.test."}


def valid_name(n):
    """Whether DNS can carry the name at all (the suite has longer labels)."""
    labels = n.rstrip(".").split(".")
    return all(0 < len(lab.encode()) <= 63 for lab in labels) and len(n.encode()) <= 253


def name_text(n):
    """Presentation form: bytes that are not plain name characters as \\DDD
    (the suite has a name with spaces; unbound's parser takes the escapes)."""
    plain = set(string.ascii_letters + string.digits + "-_.*/:%+=,!#&~^`{}|[]<>?")
    return "".join(chr(b) if chr(b) in plain else "\\%03d" % b for b in n.encode())


def txt_string(s):
    b = s.encode("latin-1") if all(ord(c) < 256 for c in s) else s.encode("utf-8")
    return '"' + "".join(chr(c) if 0x20 <= c < 0x7F and c not in (0x22, 0x5C) else "\\%03d" % c for c in b) + '"'


def fqdn(host):
    host = str(host).rstrip(".")
    return name_text(host) + "." if host else "."


def rr_lines(name, entries):
    """(local-data records, has TIMEOUT) for one owner name."""
    lines = []
    timeout = "TIMEOUT" in entries
    kv = [next(iter(e.items())) for e in entries if e != "TIMEOUT"]
    has_txt = any(k == "TXT" for k, _ in kv)  # includes TXT: NONE
    for k, v in kv:
        if k in ("SPF", "TXT"):
            if (k == "SPF" and has_txt) or v == "NONE":
                continue
            strings = (v if isinstance(v, list) else [v]) or [""]
            lines.append(f"{name}. 300 IN TXT " + " ".join(txt_string(str(s)) for s in strings))
        elif k in ("A", "AAAA"):
            lines += [f"{name}. 300 IN {k} {ip}" for ip in (v if isinstance(v, list) else [v])]
        elif k == "MX":
            pref, host = v
            lines.append(f"{name}. 300 IN MX {pref} {fqdn(host)}")
        elif k in ("PTR", "CNAME"):
            lines.append(f"{name}. 300 IN {k} {fqdn(v)}")
        else:
            sys.exit(f"rfc7208_to_unbound: unknown record type {k!r} at {name}")
    return lines, timeout


def field(v):
    v = "" if v is None else str(v)
    if any(c in v for c in "\t\r\n"):
        sys.exit(f"rfc7208_to_unbound: a tab or newline in a test field: {v!r}")
    return v


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    src = sys.argv[2] if len(sys.argv) == 3 else SRC
    if not os.path.exists(src):
        sys.exit(f"rfc7208_to_unbound: {src} is missing: run scripts/install-deps (Debian package python3-spf)")
    os.makedirs(out, exist_ok=True)
    index = []
    with gzip.open(src) as f:
        docs = list(yaml.safe_load_all(f))
    for i, doc in enumerate(docs):
        zd = {}
        for n, e in (doc.get("zonedata") or {}).items():
            key = str(n).lower().rstrip(".")
            zd.setdefault(key, []).extend(e)  # names differing only in case are one DNS name
        deny = {name_text(n) for n, e in zd.items() if "TIMEOUT" in e and valid_name(n)}
        zones, data = [], []
        for name, entries in zd.items():
            if not valid_name(name):
                continue
            name = name_text(name)
            lines, timeout = rr_lines(name, entries)
            zone = None
            if timeout:
                zone = "deny"
            elif any(name.endswith("." + d) for d in deny | {"timeout.test"}):
                zone = "static"
            if zone and f"{name}." not in BASE_ZONES:
                zones.append(f'    local-zone: "{name}." {zone}\n')
            data += ["    local-data: '" + line.replace("'", "\\'") + "'\n" for line in lines]
        with open(os.path.join(out, f"doc{i:02}.conf"), "w") as f:
            f.write("".join(zones + data))
        tests = doc.get("tests") or {}
        with open(os.path.join(out, f"doc{i:02}.tsv"), "w") as f:
            for tname, t in tests.items():
                res = t["result"] if isinstance(t["result"], list) else [t["result"]]
                row = [tname, t["host"], t.get("helo", ""), t.get("mailfrom", ""), ",".join(str(r).lower() for r in res)]
                f.write("\t".join(field(v) for v in row) + "\n")
        index.append(f"{i:02}\t{len(tests)}\t{field(doc.get('description', ''))}\n")
    with open(os.path.join(out, "index.tsv"), "w") as f:
        f.write("".join(index))


if __name__ == "__main__":
    main()
