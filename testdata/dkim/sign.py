#!/usr/bin/python3
"""Signs the message on stdin with dkimpy (python3-dkim), an independent implementation:
`sign.py KEY.pem DOMAIN SELECTOR`, relaxed/relaxed, From, To, Subject, Date and
Message-ID signed. Prints the DKIM-Signature field followed by the message."""
import sys

import dkim

key_file, domain, selector = sys.argv[1:4]
message = sys.stdin.buffer.read()
with open(key_file, "rb") as f:
    key = f.read()
field = dkim.sign(
    message,
    selector.encode(),
    domain.encode(),
    key,
    canonicalize=(b"relaxed", b"relaxed"),
    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
)
sys.stdout.buffer.write(field + message)
