"""The bottom layer, as GNU Mach's include/mach: Mach types, constants, the message
format and its wire encoding, and the interface definitions (our MIG, the kernel's and
the name service's interfaces). Every layer may import it; it imports only the standard
library and `pymach.errors`."""
