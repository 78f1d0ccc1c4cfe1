"""The network (paper 3.2, 4.2): the netmsgserver and what it stands on.

netmsgserver.py (ports across hosts, every right moving between them, the network's name
service), portops.py (the few kernel-side port operations the server needs), cor.py (the
pager that serves out-of-line memory sent to another host, copy-on-reference),
pending.py (calls in flight to other hosts, failed when their host dies), packets.py
(the typed packets between servers), transport.py (the one seam to a network: bytes to a
host), tcp.py (that seam over TCP with mutual TLS; cluster.py makes its credentials),
station.py (a host: kernel, server task, transport events as wire-port messages),
network.py (the in-process simulated network with fault injection), netname.py (the
name service's client stubs and a local name server; its interface is in
include/netname_defs.py). Nothing here unpickles.
"""
