"""The machine-independent virtual memory system (paper sections 3.3, 3.4, 5 and 6)."""
