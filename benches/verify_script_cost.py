#!/usr/bin/env python3
"""Redis's instructions per verification for the VERIFY script, counted by callgrind.

    python3 benches/verify_script_cost.py [--batch 1 9 32] [--rounds 300] [--script FILE]
                                          [--legacy-layout]

Starts its own `redis-server` under `valgrind --tool=callgrind` on a free loopback port, stores
one session and 200 key records shaped like the service's (same key names, field names and
sizes), then sends EVALSHA calls of the VERIFY script exactly as the service builds them
(`src/store/redis/batch.rs`, `command`), `--batch` verifications per call. Counters are zeroed
after a warm-up and dumped after `--rounds` calls; the figure printed is every instruction
redis-server executed in between (network read, parsing, the script, its commands, the
reply) divided by the verifications. Instruction counts do not depend on what else the machine
is doing, so two versions of the script can be compared on a shared machine; `--script` runs
another version (a file holding only the Lua text) with the same arguments, and
`--legacy-layout` sends the arguments as scripts before 2026-11-30 took them (seven per
verification: hash, now, cost, environment, day TTL, minute, minute TTL; only the plan limits
shared), to count an older script from the history, e.g.
`git show 3bee7ac:src/store/redis/scripts.rs`, its VERIFY text saved to a file.

The script text comes from `src/store/redis/scripts.rs`; the arguments below follow the
layout documented there and must change with it. Needs python3, valgrind and redis-server.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS_PER_RUN = 200
SHARD = 17
PREFIX = "sk"


def resp(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def call(self, *args):
        self.sock.sendall(resp(args))
        return self.read()

    def read(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError("unexpected reply %r" % line)


def verify_script(path):
    if path:
        with open(path) as f:
            return f.read()
    with open(os.path.join(ROOT, "src/store/redis/scripts.rs")) as f:
        source = f.read()
    match = re.search(r'pub static VERIFY\b.*?r#"(.*?)"#', source, re.S)
    if not match:
        sys.exit("VERIFY script not found in src/store/redis/scripts.rs")
    return match.group(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def totals(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in " + path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 9, 32])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--script", help="a file with another version of the Lua text")
    parser.add_argument("--legacy-layout", action="store_true",
                        help="seven arguments per verification (scripts before 2026-11-30)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if not shutil.which(tool):
            sys.exit(
                f"{tool} not found: install it (Debian/Ubuntu: apt-get install -y "
                f"{'redis-server' if tool == 'redis-server' else 'valgrind'})"
            )
    script = verify_script(args.script)
    work = tempfile.mkdtemp(prefix="verify-cost-")
    port = free_port()
    server = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind",
            "--callgrind-out-file=" + os.path.join(work, "cg.out"),
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        conn = None
        for _ in range(600):
            try:
                conn = Conn(port)
                conn.call("PING")
                break
            except (OSError, RuntimeError):
                conn = None
                time.sleep(0.1)
        if conn is None:
            sys.exit("redis-server under valgrind did not start")
        run(conn, server.pid, script, args, work)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def run(conn, pid, script, args, work):
    tag = "%s:{%d}" % (PREFIX, SHARD)
    now = int(time.time() * 1000)
    conn.call("HSET", tag + ":sessions", "acme-prod",
              "3:3:1:::%d:%d:1" % (now, now))
    keys = []
    for i in range(KEYS_PER_RUN):
        key_id = "K%07d" % i
        digest = bytes([1]) + os.urandom(32)
        conn.call("HSET", "%s:k:%s" % (tag, key_id), "h", digest, "s", "acme-prod",
                  "e", "3", "ct", str(now))
        keys.append((key_id, digest))
    sha = conn.call("SCRIPT", "LOAD", script)
    day = time.strftime("%Y%m%d", time.gmtime(now / 1000))
    done = 0

    def call(batch):
        nonlocal done
        # One clock reading per script call: the service never mixes minutes in one.
        t = now + done
        window = t // 60000
        shared = ["7862400", str(window % 60), "10800"]
        names, per_call = [], []
        for j in range(batch):
            key_id, digest = keys[(done + j) % len(keys)]
            names += ["%s:k:%s" % (tag, key_id), tag + ":sessions",
                      "%s:u:%s:%s" % (tag, key_id, day),
                      "%s:m:%s:%d" % (tag, key_id, t // 3600000)]
            per_call += [digest, str(t), "1", "0"]
            if args.legacy_layout:
                per_call += shared
        argv = ["60", "600", "6000", "0"]
        if not args.legacy_layout:
            argv += shared + [str(window)]
        reply = conn.call("EVALSHA", sha, len(names), *names, *argv, *per_call)
        answers = reply.split(b"\n")
        if len(answers) != batch or not all(a.startswith(b"1:") for a in answers):
            raise RuntimeError("unexpected answers: %r" % reply[:200])
        done += batch

    print("redis-server instructions per verification (VERIFY script, callgrind):")
    for batch in args.batch:
        for _ in range(20):
            call(batch)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(args.rounds):
            call(batch)
        before = set(os.listdir(work))
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(set(os.listdir(work)) - before)
        total = totals(os.path.join(work, dumps[-1]))
        print("  %3d per script call: %7.0f" % (batch, total / (batch * args.rounds)))


if __name__ == "__main__":
    main()
