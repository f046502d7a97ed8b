"""Committed transcripts (issue 12 §3), and the command that records them again:
``python -m tests.replays.record``."""
