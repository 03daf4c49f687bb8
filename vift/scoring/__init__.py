"""Scoring: answer extraction and matching, and the statistics every verdict is drawn with.

Pure functions on strings and numbers, below every package that scores (fusion calibration,
evaluation, the registry gate).
"""
