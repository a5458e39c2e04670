"""Enclave bots: the bot framework and the announcement bot (not built yet; see README)."""
