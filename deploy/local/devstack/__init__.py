"""Enclave's local dev/test launchers (``make run``, the integration tests, the benches):
a throwaway Synapse (:mod:`devstack.synapse`), two federating ones
(:mod:`devstack.federation`), a private slapd (:mod:`devstack.slapd`), a round-robin proxy
(:mod:`devstack.proxy`) and the whole local stack (``python -m devstack.stack``).

A distribution of its own (``deploy/local/pyproject.toml``), never in Enclave's wheel; it may
run Enclave, Enclave never imports it.
"""
