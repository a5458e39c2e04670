"""Capture of encrypted rooms: Enclave's archive device (an E2EE member of every room whose
class says ``capture: required``) archives the plaintext beside the ciphertext, and records
what it cannot decrypt as capture gaps, retried when keys arrive.

:mod:`.decisions` (pure), :mod:`.store` (the gaps), :mod:`.device` (the archive device) and
:mod:`.bot` (the archive bot, an inbox handler).
"""
