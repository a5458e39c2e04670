"""The vocabulary every layer shares and nothing below it: people and groups as the directory
describes them, and the staff record Enclave keeps. Frozen data, no I/O, no imports from the
rest of ``bridge`` (the bottom of the layer contract in ``pyproject.toml``)."""
