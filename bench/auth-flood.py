#!/usr/bin/env python3
"""bench/auth-flood.py - AUTH under attack: how many AUTH attempts per second Postern
answers while a password-guessing flood runs, and how ordinary mail fares meanwhile.

Starts the release build with a submission listener (STARTTLS, AUTH) and a plain
inbound listener, then for DURATION seconds:
  - ATTACKERS threads, each from its own source address (127.0.0.2, .3, ...), open a TLS
    session and send AUTH PLAIN with wrong passwords as fast as replies come back;
  - one ordinary client sends small messages on the inbound port, one after another,
    and records the time each takes.
Prints attempts/s by reply (535 wrong password, 454 locked out) and the ordinary
client's message latency (median, p99, max).

Usage: bench/auth-flood.py [ATTACKERS=100] [DURATION=20] [MAX_FAILURES=5]
"""
import base64, os, socket, ssl, statistics, subprocess, sys, tempfile, threading, time

ATTACKERS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
DURATION = float(sys.argv[2]) if len(sys.argv) > 2 else 20
MAX_FAILURES = int(sys.argv[3]) if len(sys.argv) > 3 else 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target/release/postern"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise EOFError
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3])


def main():
    tmp = tempfile.mkdtemp()
    sub, inbound = free_port(), free_port()
    users = os.path.join(tmp, "users")
    conf = os.path.join(tmp, "postern.toml")
    with open(conf, "w") as f:
        f.write(f"""hostname = "bench.local"
spool_dir = "{tmp}/spool"
[[listener]]
address = "127.0.0.1:{inbound}"
tls = "none"
[[listener]]
address = "127.0.0.1:{sub}"
tls = "starttls"
auth = "required"
max_connections = 5000
per_ip_connections = 100
[relay]
accepted_domains = ["bench.test"]
trusted_networks = []
[auth]
users_file = "{users}"
max_failures = {MAX_FAILURES}
failure_window = "10m"
lockout = "15m"
[[route]]
domains = ["*"]
next_hop = "[127.0.0.1]:1"
""")
    subprocess.run([BIN, "user", "add", "alice", "--password-stdin", "--config", conf],
                   input=b"the right one\n", check=True)
    log = open(os.path.join(tmp, "log"), "w")
    server = subprocess.Popen([BIN, "serve", "--config", conf], stderr=log,
                              env=dict(os.environ, RUST_LOG="error"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", inbound)).close()
            break
        except OSError:
            time.sleep(0.05)
    stop = time.time() + DURATION
    counts = {}
    lock = threading.Lock()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def attacker(i):
        src = f"127.0.{1 + (i + 1) // 250}.{1 + (i + 1) % 250}"
        n = 0
        while time.time() < stop:
            try:
                s = socket.create_connection(("127.0.0.1", sub), source_address=(src, 0), timeout=30)
                f = s.makefile("rb")
                reply(f)
                s.sendall(b"EHLO attacker\r\n"); reply(f)
                s.sendall(b"STARTTLS\r\n"); reply(f)
                t = ctx.wrap_socket(s)
                f = t.makefile("rb")
                t.sendall(b"EHLO attacker\r\n"); reply(f)
                while time.time() < stop:
                    n += 1
                    cred = base64.b64encode(f"\0alice\0guess{i}-{n}".encode())
                    t.sendall(b"AUTH PLAIN " + cred + b"\r\n")
                    code = reply(f)
                    with lock:
                        counts[code] = counts.get(code, 0) + 1
                t.close()
            except (OSError, EOFError, ssl.SSLError):
                with lock:
                    counts["conn-error"] = counts.get("conn-error", 0) + 1

    latencies = []

    def ordinary():
        s = socket.create_connection(("127.0.0.1", inbound), timeout=30)
        f = s.makefile("rb")
        reply(f)
        s.sendall(b"EHLO ordinary\r\n"); reply(f)
        while time.time() < stop:
            t0 = time.time()
            s.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<u@bench.test>\r\nDATA\r\n")
            reply(f); reply(f); reply(f)
            s.sendall(b"Subject: hi\r\n\r\nordinary mail\r\n.\r\n")
            assert reply(f) == 250
            latencies.append(time.time() - t0)
            time.sleep(0.05)

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(ATTACKERS)]
    threads.append(threading.Thread(target=ordinary))
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    server.terminate()
    server.wait()
    total = sum(v for k, v in counts.items() if isinstance(k, int))
    print(f"attackers={ATTACKERS} max_failures={MAX_FAILURES} seconds={elapsed:.1f} "
          f"auth_answers_per_s={total / elapsed:.0f} "
          + " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)))
    if latencies:
        lat = sorted(latencies)
        print(f"ordinary messages={len(lat)} median_ms={1000 * statistics.median(lat):.1f} "
              f"p99_ms={1000 * lat[int(0.99 * (len(lat) - 1))]:.1f} max_ms={1000 * lat[-1]:.1f}")


main()
