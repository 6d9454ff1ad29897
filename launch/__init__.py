"""Thin entry scripts; each exposes main(argv=None)."""
