#!/usr/bin/python3
"""Holds idle and slow HTTP clients against a metrics address while timing scrapes of it.

Run inside the namespace of the server (ip netns exec NS python3 slow_clients.py ADDR ...).
Opens `--idle` connections that send nothing and `--slow` ones that send one byte of a request
every `--interval` seconds, then, while all of them hang on, scrapes /metrics over a new
connection every 0.2 s for `--duration` seconds. Prints one JSON object: each scrape's latency
in seconds (null when it was not answered within `--scrape-timeout`), its HTTP status line, and
whether the body held `--expect`. Bounded: everything is closed after `--duration` seconds.
"""

import argparse
import json
import socket
import time

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: vmnet\r\nUser-Agent: slow\r\n" + b"X-Slow: 1\r\n" * 64


def connect(host, port, timeout):
    s = socket.create_connection((host, port), timeout=timeout)
    s.setblocking(False)
    return s


def scrape(host, port, timeout, expect):
    """(latency or None, status line, body holds `expect`)."""
    start = time.monotonic()
    deadline = start + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: vmnet\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, data[:40].decode(errors="replace"), False
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    except OSError as e:
        return None, f"error: {e}", False
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return time.monotonic() - start, status, expect.encode() in data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--idle", type=int, default=2)
    p.add_argument("--slow", type=int, default=300)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--scrape-timeout", type=float, default=3.0)
    p.add_argument("--expect", default="vmnet_")
    args = p.parse_args()
    host, port = args.address.rsplit(":", 1)
    port = int(port)

    idle, slow, refused = [], [], 0
    connect_deadline = time.monotonic() + 3.0  # bounded, even when the server's backlog is full
    for i in range(args.idle + args.slow):
        left = connect_deadline - time.monotonic()
        try:
            if left <= 0:
                raise OSError("no time left to connect")
            s = connect(host, port, min(left, 1.0))
        except OSError:
            refused += 1
            continue
        (idle if i < args.idle else slow).append(s)
    sent = {s: 0 for s in slow}
    scrapes = []
    start = time.monotonic()
    next_byte = start
    next_scrape = start + args.interval * 2  # every slow client has begun its request
    while time.monotonic() < start + args.duration:
        now = time.monotonic()
        if now >= next_byte:
            for s in list(sent):
                try:
                    s.send(REQUEST[sent[s] % len(REQUEST):][:1])
                    sent[s] += 1
                except OSError:
                    del sent[s]  # closed by the server: allowed
            next_byte += args.interval
        if now >= next_scrape:
            scrapes.append(scrape(host, port, args.scrape_timeout, args.expect))
            next_scrape = time.monotonic() + 0.2
        wake = min(next_byte, next_scrape, start + args.duration)
        time.sleep(max(0.0, wake - time.monotonic()))
    for s in idle + slow:
        s.close()
    print(json.dumps({
        "connected": len(idle) + len(slow), "refused": refused,
        "slow_still_open": len(sent),
        "scrapes": [{"latency": l, "status": st, "expected": ok} for l, st, ok in scrapes],
    }))


if __name__ == "__main__":
    main()
