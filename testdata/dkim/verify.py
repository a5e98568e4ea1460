#!/usr/bin/python3
"""Verifies every DKIM-Signature of the message on stdin with dkimpy (python3-dkim), an
independent implementation, against the key records given as arguments
(`NAME=TXT`, e.g. `s1._domainkey.company.test=v=DKIM1; k=rsa; p=...`); no DNS is asked.

Prints one line per signature, `pass d=... s=... a=...` or `fail ...`, and exits 0 only
if there is at least one signature and every one verifies."""
import sys

import dkim

records = {}
for arg in sys.argv[1:]:
    name, _, text = arg.partition("=")
    records[name.rstrip(".").lower() + "."] = text.encode()


def dnsfunc(name, timeout=5):
    key = name.decode() if isinstance(name, bytes) else name
    key = key.rstrip(".").lower() + "."
    return records.get(key, b"")


message = sys.stdin.buffer.read()
d = dkim.DKIM(message)
count = message.lower().count(b"\ndkim-signature:") + message.lower().startswith(b"dkim-signature:")
ok = count > 0
for i in range(count):
    try:
        good = d.verify(idx=i, dnsfunc=dnsfunc)
    except Exception as e:  # dkimpy raises on malformed input
        good = False
        print(f"error {e}")
    sig = dict(d.signature_fields) if d.signature_fields else {}
    tags = " ".join(
        f"{k.decode()}={sig.get(k, b'').decode()}" for k in (b"d", b"s", b"a")
    )
    print(("pass " if good else "fail ") + tags)
    ok = ok and good
sys.exit(0 if ok else 1)
