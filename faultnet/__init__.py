"""faultnet."""
