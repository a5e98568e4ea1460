#!/usr/bin/env python3
"""A no-op milter on the reference libmilter (Debian python3-milter), for the benchmark
(bench/milter.sh): it asks for every stage, answers each with continue, changes nothing.
Usage: noop.py PORT
"""
import sys

import Milter


class Noop(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def hello(self, name):
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        return Milter.CONTINUE

    def header(self, name, value):
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        return Milter.ACCEPT


def main():
    Milter.factory = Noop
    Milter.set_flags(0)
    Milter.runmilter("noop", "inet:%s@127.0.0.1" % sys.argv[1], 60)


if __name__ == "__main__":
    main()
