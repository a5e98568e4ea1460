#!/usr/bin/env python3
"""A scripted milter on the reference libmilter (Debian python3-milter, pymilter), for the
interop tests of postern_smtp::milter. Usage: scripted.py PORT

What it does, by what it sees:
- CONNECT: no reply (@noreply, so SMFIP_NR_CONN); HELO: not wanted (no callback, so
  SMFIP_NOHELO); headers: no reply (SMFIP_NR_HDR).
- MAIL from an address containing "reject-sender": 550 5.7.1 with its own text.
- RCPT to <refuse...>: 550 5.1.1 for that recipient only.
- end of message: a body holding REJECTME gets a two-line 554 5.7.1; otherwise the
  milter adds X-Scripted (the client address, the macro i, the number of body octets)
  and rewrites the Subject, then accepts.
"""
import sys

import Milter


class Scripted(Milter.Base):
    def __init__(self):
        self.id = Milter.uniqueID()
        self.client = None
        self.queue_id = None
        self.subject = None
        self.octets = b""

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        self.client = hostaddr[0] if hostaddr else hostname
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        self.queue_id = self.getsymval("i")
        self.subject = None
        self.octets = b""
        if "reject-sender" in sender:
            self.setreply("550", "5.7.1", "sender refused by the scripted milter")
            return Milter.REJECT
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        if recipient.startswith("<refuse"):
            self.setreply("550", "5.1.1", "no such user here")
            return Milter.REJECT
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        if name.lower() == "subject":
            self.subject = value
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        self.octets += chunk
        return Milter.CONTINUE

    def eom(self):
        if b"REJECTME" in self.octets:
            self.setreply("554", "5.7.1", "rejected by the scripted milter", "second line")
            return Milter.REJECT
        self.addheader(
            "X-Scripted",
            "client=%s i=%s bytes=%d" % (self.client, self.queue_id, len(self.octets)),
        )
        self.chgheader("Subject", 1, "[scripted] %s" % self.subject)
        return Milter.ACCEPT


def main():
    port = int(sys.argv[1])
    Milter.factory = Scripted
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS)
    Milter.runmilter("scripted", "inet:%d@127.0.0.1" % port, 30)


if __name__ == "__main__":
    main()
