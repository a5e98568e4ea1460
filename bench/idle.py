#!/usr/bin/env python3
"""bench/idle.py - hold N idle SMTP connections open against Postern (interface:
"a relay is expected to hold 10,000 idle connections when [the limits] are raised") and
report the server's memory with them all open, and whether a new client still gets its
greeting at once.

Usage: bench/idle.py [N=10000]
"""
import os, resource, socket, subprocess, sys, tempfile, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target/release/postern"))

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
tmp = tempfile.mkdtemp()
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
conf = os.path.join(tmp, "postern.toml")
with open(conf, "w") as f:
    f.write(f"""hostname = "bench.local"
spool_dir = "{tmp}/spool"
[[listener]]
address = "127.0.0.1:{port}"
max_connections = {N + 100}
per_ip_connections = {N + 100}
""")
server = subprocess.Popen([BIN, "serve", "--config", conf], stderr=open(os.path.join(tmp, "log"), "w"),
                          env=dict(os.environ, RUST_LOG="warn"))
time.sleep(0.5)


def mem(pid):
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


base = mem(server.pid)
conns = []
t0 = time.time()
for i in range(N):
    c = socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.{1 + i // 250}.{2 + i % 250}", 0))
    conns.append(c)
for c in conns:
    c.settimeout(30)
    assert c.recv(512).startswith(b"220 ")
opened = time.time() - t0
time.sleep(1)
held = mem(server.pid)
t1 = time.time()
probe = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.1", 0))
probe.settimeout(10)
assert probe.recv(512).startswith(b"220 ")
greet_ms = (time.time() - t1) * 1000
print(f"idle_connections={N} open_s={opened:.1f} rss_kib={held[0]} pss_kib={held[1]} "
      f"baseline_rss_kib={base[0]} per_connection_kib={(held[0] - base[0]) / N:.1f} "
      f"new_client_greeting_ms={greet_ms:.1f}")
for c in conns:
    c.close()
server.terminate()
server.wait()
