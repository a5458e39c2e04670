"""Pure policy: decide_*/diff_* functions returning Actions. Imports nothing that does I/O."""
