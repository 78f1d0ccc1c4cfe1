"""Network message server: the name service now; ports across hosts later (3.2, 4.2)."""
