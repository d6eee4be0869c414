"""reliablewriter."""
