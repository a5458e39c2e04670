"""The Matrix-domain kernel: pure rules of the Matrix spec every part of Enclave shares.

Power levels (with the one room-creator rule), membership, relations (reply, thread, edit,
redaction), reply-fallback stripping, durations and timestamps. No I/O, no clock, no
imports from the rest of ``bridge`` (tests/unit/kernel/test_purity.py checks it): policy,
services, adapters and the bots all call these functions instead of keeping a copy.
"""
