"""The `pymach` command."""
