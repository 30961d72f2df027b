"""Sends hand-made frames from inside a test namespace and reports what came back.

Usage: probe.py IFACE CASES_JSON, where CASES_JSON is a list of
{"name": ..., "port": DPORT, "pkt": SCAPY_EXPRESSION}. Each expression builds one frame
or a list of frames (fragments); after sending, replies from DPORT are collected for a
second. Prints {"name": "synack" | "rst" | "none", ...} as JSON.

The expressions come from the test itself (tests/tests/hostile.rs), never from outside.
"""

import json
import sys
import time

from scapy.all import (  # noqa: F401  (used by the expressions)
    IP, TCP, Dot1Q, Ether, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, AsyncSniffer,
    IPOption_NOP, conf, fragment, sendp,
)

conf.verb = 0
iface, cases = sys.argv[1], json.loads(sys.argv[2])
out = {}
for c in cases:
    frames = eval(c["pkt"])  # noqa: S307 - test-written expressions
    if not isinstance(frames, list):
        frames = [frames]
    port = c["port"]
    sniffer = AsyncSniffer(
        iface=iface,
        store=True,
        lfilter=lambda p, port=port: TCP in p and p[TCP].sport == port,
    )
    sniffer.start()
    time.sleep(0.3)
    sendp(frames, iface=iface)
    time.sleep(1.0)
    got = [str(p[TCP].flags) for p in sniffer.stop()]
    if any("S" in f and "A" in f for f in got):
        out[c["name"]] = "synack"
    elif any("R" in f for f in got):
        out[c["name"]] = "rst"
    else:
        out[c["name"]] = "none"
print(json.dumps(out))
