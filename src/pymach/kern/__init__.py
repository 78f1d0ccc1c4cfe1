"""Kernel: tasks, threads, the host, scheduling, traps, the kernel server and its side of
MIG (3.1)."""
