"""Native mode on Linux: the machd host daemon, tasks as processes, real memory."""
