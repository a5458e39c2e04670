"""Unit tests of retention: archive, holds, purge and export."""
