#!/usr/bin/env python3
"""A scripted milter on the reference libmilter (Debian python3-milter, pymilter) for the
daemon's integration tests (crates/postern/tests/it/milter.rs).

Usage: scenario.py ADDRESS NAME [MODE]
  ADDRESS  a port on 127.0.0.1, or unix:/path
  NAME     its name in the headers it adds
  MODE     "script" (default): behaviour chosen by the message, below
           "sleep": sleeps 10 s at end of message, then accepts (timeouts, a kill)
           "progress": at end of message sends SMFIR_PROGRESS every 0.3 s for 2 s, then
                       adds X-Progress and accepts
           "tag": adds "X-Order: NAME after <the X-Order values it saw>" and accepts
           "continue": as "script", but answers end of message with continue, not
                       accept (libmilter then takes SMFIC_QUIT_NC: the MTA may keep
                       the connection for its next SMTP connection)

In "script" mode, by what it sees:
- MAIL from an address containing "mail-reject": 550 5.7.0 with its own text;
  "mail-tempfail": tempfail (the MTA's default reply); "mail-discard": discard.
- RCPT to an address starting "rcpt-reject": 553 5.1.3 with its own text;
  "rcpt-tempfail": tempfail.
- End of message, by the Subject:
  "reject-me" 554 5.7.1 two lines; "tempfail-me" tempfail; "discard-me" discard;
  "quarantine-me" quarantine "scenario says hold"; "edit-headers" adds X-Added,
  inserts X-Inserted first, changes Subject, deletes X-Remove; "change-sender" new
  sender <new-sender@outside.test>; "change-rcpts" adds <added@accepted.test> and
  removes <user@accepted.test>; "replace-body" a new body; "bloat-body" a new body of
  80 KiB (over the tests' max_message_size).
  Every accepted message gets "X-Scenario: NAME i=<macro i> client=<client_addr>
  mail=<mail_addr> rcpts=<rcpt_addr values>".
"""
import os
import sys
import time

import Milter

NAME = "scenario"
MODE = "script"


class Scenario(Milter.Base):
    def __init__(self):
        self.client_addr = None
        self.mail = None
        self.rcpts = []
        self.subject = ""
        self.orders = []

    def connect(self, hostname, family, hostaddr):
        self.client_addr = self.getsymval("{client_addr}")
        return Milter.CONTINUE

    def hello(self, name):
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        self.mail = self.getsymval("{mail_addr}")
        self.rcpts = []
        self.subject = ""
        self.orders = []
        if "mail-reject" in sender:
            self.setreply("550", "5.7.0", "custom sender refusal")
            return Milter.REJECT
        if "mail-tempfail" in sender:
            return Milter.TEMPFAIL
        if "mail-discard" in sender:
            return Milter.DISCARD
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        if recipient.startswith("<rcpt-reject"):
            self.setreply("553", "5.1.3", "custom recipient refusal")
            return Milter.REJECT
        if recipient.startswith("<rcpt-tempfail"):
            return Milter.TEMPFAIL
        self.rcpts.append(self.getsymval("{rcpt_addr}"))
        return Milter.CONTINUE

    def header(self, name, value):
        if name.lower() == "subject":
            self.subject = value
        if name.lower() == "x-order":
            self.orders.append(value)
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        if MODE == "sleep":
            time.sleep(10)
            return Milter.ACCEPT
        if MODE == "progress":
            for _ in range(7):
                time.sleep(0.3)
                self.progress()
            self.addheader("X-Progress", NAME)
            return Milter.ACCEPT
        if MODE == "tag":
            seen = ",".join(self.orders) if self.orders else "none"
            self.addheader("X-Order", "%s after %s" % (NAME, seen))
            return Milter.ACCEPT
        s = self.subject
        if "reject-me" in s:
            self.setreply("554", "5.7.1", "custom body refusal", "second line")
            return Milter.REJECT
        if "tempfail-me" in s:
            return Milter.TEMPFAIL
        if "discard-me" in s:
            return Milter.DISCARD
        if "quarantine-me" in s:
            self.quarantine("scenario says hold")
        if "edit-headers" in s:
            self.addheader("X-Added", "added by " + NAME)
            self.addheader("X-Inserted", "first", 0)
            self.chgheader("Subject", 1, "[edited] " + s)
            self.chgheader("X-Remove", 1, None)
        if "change-sender" in s:
            self.chgfrom("<new-sender@outside.test>")
        if "change-rcpts" in s:
            self.addrcpt("<added@accepted.test>")
            self.delrcpt("<user@accepted.test>")
        if "replace-body" in s:
            self.replacebody(b"This body was replaced by the milter.\r\n")
        if "bloat-body" in s:
            for _ in range(20):
                self.replacebody(b"x" * 4094 + b"\r\n")
        self.addheader(
            "X-Scenario",
            "%s i=%s client=%s mail=%s rcpts=%s"
            % (NAME, self.getsymval("i"), self.client_addr, self.mail, ",".join(self.rcpts)),
        )
        return Milter.CONTINUE if MODE == "continue" else Milter.ACCEPT


def main():
    global NAME, MODE
    address = sys.argv[1]
    NAME = sys.argv[2]
    if len(sys.argv) > 3:
        MODE = sys.argv[3]
    if address.startswith("unix:"):
        conn = address
    else:
        conn = "inet:%s@127.0.0.1" % address
    Milter.factory = Scenario
    Milter.set_flags(
        Milter.ADDHDRS
        | Milter.CHGHDRS
        | Milter.CHGFROM
        | Milter.ADDRCPT
        | Milter.DELRCPT
        | Milter.CHGBODY
        | Milter.QUARANTINE
    )
    sys.stdout.flush()
    Milter.runmilter(NAME, conn, 60)
    os._exit(0)


if __name__ == "__main__":
    main()
