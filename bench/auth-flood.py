#!/usr/bin/env python3
"""bench/auth-flood.py - AUTH under attack: how many AUTH attempts per second Postern
answers while a password-guessing flood runs, and how ordinary mail fares meanwhile.

Starts the release build with a submission listener (STARTTLS, AUTH) and a plain
inbound listener, then for DURATION seconds:
  - ATTACKERS threads, each from its own source address (127.0.0.2, .3, ...), open a TLS
    session and send AUTH PLAIN with wrong passwords as fast as replies come back;
  - one ordinary client sends small messages on the inbound port, one after another,
    and records the time each takes.
Prints attempts/s by reply (535 wrong password, 454 locked out, 235 a guess that got
in) and the ordinary client's message latency (median, p99, max).

NODES=2 (environment): two Postern nodes sharing one Redis ([cluster], a redis-server
started here on a free port, no persistence), as behind a load balancer. Each attacker
moves to the other node after every connection, and every attacker's guess number
MAX_FAILURES + 1 is the right password: without shared counting a node that has not
seen that attacker would still let it guess. A legitimate user (bob, right password)
logs in on alternate nodes every 50 ms meanwhile; its AUTH latency is reported as well.
SHARED=0 with NODES=2: the same two nodes without [cluster] (each counts alone), the
control run.

Usage: [NODES=1|2] bench/auth-flood.py [ATTACKERS=100] [DURATION=20] [MAX_FAILURES=5]
"""
import base64, os, socket, ssl, statistics, subprocess, sys, tempfile, threading, time

ATTACKERS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
DURATION = float(sys.argv[2]) if len(sys.argv) > 2 else 20
MAX_FAILURES = int(sys.argv[3]) if len(sys.argv) > 3 else 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target/release/postern"))
NODES = int(os.environ.get("NODES", "1"))
SHARED = os.environ.get("SHARED", "1") != "0"


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


def start_redis(tmp):
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def start_node(tmp, name, users, cluster):
    sub, inbound = free_port(), free_port()
    os.makedirs(os.path.join(tmp, name))
    conf = os.path.join(tmp, name, "postern.toml")
    with open(conf, "w") as f:
        f.write(f"""hostname = "{name}.bench.local"
spool_dir = "{tmp}/{name}/spool"
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
{cluster}
""")
    log = open(os.path.join(tmp, name, "log"), "w")
    server = subprocess.Popen([BIN, "serve", "--config", conf], stderr=log,
                              env=dict(os.environ, RUST_LOG="error"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", inbound)).close()
            break
        except OSError:
            time.sleep(0.05)
    return server, sub, inbound, conf


def main():
    tmp = tempfile.mkdtemp()
    users = os.path.join(tmp, "users")
    open(users, "w").close()
    redis = None
    cluster = ""
    if NODES > 1 and SHARED:
        redis, rport = start_redis(tmp)
        cluster = f'[cluster]\nredis = "redis://127.0.0.1:{rport}/0"\n'
    nodes = [start_node(tmp, f"node{i}", users, cluster) for i in range(NODES)]
    for name, password in (("alice", b"the right one\n"), ("bob", b"bob's own\n")):
        subprocess.run([BIN, "user", "add", name, "--password-stdin", "--config", nodes[0][3]],
                       input=password, check=True)
    time.sleep(1.5)  # the users file is read again when it changes
    stop = time.time() + DURATION
    counts = {}
    lock = threading.Lock()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def tls_session(src, port):
        s = socket.create_connection(("127.0.0.1", port), source_address=(src, 0), timeout=30)
        f = s.makefile("rb")
        reply(f)
        s.sendall(b"EHLO client\r\n"); reply(f)
        s.sendall(b"STARTTLS\r\n"); reply(f)
        t = ctx.wrap_socket(s)
        f = t.makefile("rb")
        t.sendall(b"EHLO client\r\n"); reply(f)
        return t, f

    def attacker(i):
        src = f"127.0.{1 + (i + 1) // 250}.{1 + (i + 1) % 250}"
        n = 0
        node = i % NODES
        while time.time() < stop:
            try:
                t, f = tls_session(src, nodes[node][1])
                node = (node + 1) % NODES
                while time.time() < stop:
                    n += 1
                    password = "the right one" if n == MAX_FAILURES + 1 else f"guess{i}-{n}"
                    cred = base64.b64encode(f"\0alice\0{password}".encode())
                    t.sendall(b"AUTH PLAIN " + cred + b"\r\n")
                    code = reply(f)
                    with lock:
                        counts[code] = counts.get(code, 0) + 1
                    if code == 235 or NODES > 1:
                        break  # in, or on to the other node with a new connection
                t.close()
            except (OSError, EOFError, ssl.SSLError):
                with lock:
                    counts["conn-error"] = counts.get("conn-error", 0) + 1

    latencies = []
    logins = []

    def ordinary():
        s = socket.create_connection(("127.0.0.1", nodes[0][2]), timeout=30)
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

    def legitimate():
        node = 0
        while time.time() < stop:
            try:
                t, f = tls_session("127.0.0.1", nodes[node][1])
                t0 = time.time()
                t.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0bob\0bob's own") + b"\r\n")
                code = reply(f)
                logins.append((time.time() - t0, code))
                t.close()
            except (OSError, EOFError, ssl.SSLError):
                logins.append((0.0, "conn-error"))
            node = (node + 1) % NODES
            time.sleep(0.05)

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(ATTACKERS)]
    threads.append(threading.Thread(target=ordinary))
    threads.append(threading.Thread(target=legitimate))
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    for server, *_ in nodes:
        server.terminate()
        server.wait()
    if redis:
        redis.terminate()
        redis.wait()
    total = sum(v for k, v in counts.items() if isinstance(k, int))
    print(f"nodes={NODES} shared={int(NODES > 1 and SHARED)} attackers={ATTACKERS} max_failures={MAX_FAILURES} "
          f"seconds={elapsed:.1f} auth_answers_per_s={total / elapsed:.0f} "
          f"successes={counts.get(235, 0)} "
          + " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)))
    for name, lat in (("ordinary messages", sorted(latencies)),
                      ("legitimate logins", sorted(l for l, _ in logins))):
        if lat:
            print(f"{name}={len(lat)} median_ms={1000 * statistics.median(lat):.1f} "
                  f"p99_ms={1000 * lat[int(0.99 * (len(lat) - 1))]:.1f} "
                  f"max_ms={1000 * lat[-1]:.1f}")
    refused = sum(1 for _, c in logins if c != 235)
    print(f"legitimate logins refused={refused}")


main()
