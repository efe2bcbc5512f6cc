"""Offline analysis of the result tables (the report): reads Parquet, never runs a job."""
