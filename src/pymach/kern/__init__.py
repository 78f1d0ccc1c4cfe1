"""Kernel: tasks, threads, the host, scheduling, traps, the kernel server and our MIG (3.1)."""
