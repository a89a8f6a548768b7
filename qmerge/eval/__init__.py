"""Measurement: pure metric math, the drift of each candidate against the reference on one token
stream, the report's rows (candidates), and the independent verification of a merge."""
