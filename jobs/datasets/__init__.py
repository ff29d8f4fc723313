"""Pair-file generators for known tasks (`driver.py make-...`)."""
