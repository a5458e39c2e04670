"""Retention: archive, legal holds, purge and export."""
