"""The name service's interface (as Mach's include/servers/netname.defs).

A name server registers send rights under names; tasks find it through their bootstrap
port. Declared here so that any task can call it without importing its servers: the
local name server and the netmsgserver's network-wide one (net/), whose module
net/netname.py also gives the client stubs.
"""

from __future__ import annotations

from pymach.include.mig import INT, PORT, STR, Subsystem

netname_defs = Subsystem("netname", 1040)
netname_defs.routine("netname_check_in", "server_port", [("name", STR), ("port", PORT)],
                     doc="Register a send right to `port` under `name`.")
netname_defs.routine("netname_look_up", "server_port", [("name", STR)], [("port", PORT)],
                     doc="A send right to the port registered under `name` "
                         "(KERN_INVALID_NAME if none).")
netname_defs.routine("netname_check_out", "server_port", [("name", STR)],
                     doc="Remove the registration of `name`.")
netname_defs.routine("netname_host", "server_port", [("host", STR)], [("is_this_host", INT)],
                     doc="1 if `host` names this host, 0 for another host of the network that "
                         "is up now; KERN_INVALID_HOST for any other name.")
