"""IPC: ports, rights, per-task name spaces, messages and queues (paper 3.2)."""
