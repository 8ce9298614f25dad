"""Data: the Record, readers per format, writers, case records, splits."""
