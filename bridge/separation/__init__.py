"""Separation of work from personal contacts at run time (decisions: bridge.policy.separation)."""
