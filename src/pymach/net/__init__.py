"""The network (paper 3.2, 4.2): the netmsgserver and what it stands on.

netmsgserver.py (ports across hosts, the network's name service), packets.py (the typed
packets between servers), transport.py (the one seam to a network: bytes to a host),
station.py (a host: kernel, server task, transport events as wire-port messages),
network.py (the in-process simulated network with fault injection), netname.py (the
name service's client stubs and a local name server; its interface is in
include/netname_defs.py). Nothing here unpickles.
"""
