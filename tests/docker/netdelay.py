#!/usr/bin/env python3
"""Delays packets by a fixed time, for WAN-like latency where `tc netem` is missing.

Some kernels (this project's CI VMs among them) are built without sch_netem, so
`tc qdisc add ... netem delay 40ms` fails with "Specified qdisc kind is unknown".
This does the same job from user space with NFQUEUE: an iptables rule hands the
packets to a queue, and this program lets each one go DELAY after it arrived (a
batch verdict; the delay is constant, so order is kept).

Run it inside the network namespace whose traffic it delays, after adding a rule
there such as

    iptables -A OUTPUT -o eth1 -j NFQUEUE --queue-num 0 --queue-bypass

Unlike netem, a packet held on its way out still counts against its TCP socket
(TCP Small Queues), which then has only a few packets out per delay: a bulk
transfer out of the namespace runs at about 130 KB/s whatever the link. Delaying
what arrives instead (`INPUT -i eth1`) keeps TCP's pace, but in tests/docker.rs it
twice left a namespace with no inbound traffic at all after a while (not understood).

    nsenter -t <pid> -n python3 netdelay.py --queue 0 --delay-ms 40

`--queue-bypass` lets packets through undelayed when this program is not running.
Standard library only (raw netlink sockets). Stops on SIGTERM/SIGINT.
"""

import argparse
import collections
import errno
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NF_ACCEPT = 1


def attr(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def message(msg, queue, attrs, seq=0):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=40.0)
    args = parser.parse_args()
    delay = args.delay_ms / 1000.0

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    q = args.queue
    sock.send(message(NFQNL_MSG_CONFIG, q, [attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))], 1))
    sock.send(message(NFQNL_MSG_CONFIG, q, [attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META) + b"\0\0\0")], 2))
    sock.send(message(NFQNL_MSG_CONFIG, q, [attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 16384))], 3))
    sock.send(
        message(
            NFQNL_MSG_CONFIG,
            q,
            [attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)), attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))],
            4,
        )
    )

    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"netdelay: queue {q}, delay {args.delay_ms} ms", file=sys.stderr, flush=True)

    pending = collections.deque()  # (due, packet id), in arrival order
    while running[0]:
        now = time.monotonic()
        timeout = max(0.0, pending[0][0] - now) if pending else 0.5
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if readable:
            while True:
                try:
                    data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError as error:
                    if error.errno == errno.ENOBUFS:
                        continue
                    raise
                arrived = time.monotonic()
                offset = 0
                while offset + 16 <= len(data):
                    length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
                    if length < 16:
                        break
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + 16)
                        if code != 0 and _seq in (1, 2, 3, 4):  # the setup failed
                            print(f"netdelay: netlink error {code} configuring queue {q}", file=sys.stderr, flush=True)
                            sys.exit(1)
                        # Otherwise a verdict for packets the kernel already dropped
                        # (their interface went away): nothing to do.
                    elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                        pos = offset + 20
                        end = offset + length
                        while pos + 4 <= end:
                            alen, akind = struct.unpack_from("=HH", data, pos)
                            if alen < 4:
                                break
                            if akind & 0x7FFF == NFQA_PACKET_HDR:
                                (packet_id,) = struct.unpack_from("!I", data, pos + 4)
                                pending.append((arrived + delay, packet_id))
                            pos += (alen + 3) & ~3
                    offset += (length + 3) & ~3
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            sock.send(message(NFQNL_MSG_VERDICT_BATCH, q, [attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))]))
    # Let whatever is still held go at once.
    if pending:
        sock.send(message(NFQNL_MSG_VERDICT_BATCH, q, [attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pending[-1][1]))]))


if __name__ == "__main__":
    main()
