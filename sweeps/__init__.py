"""Ray Tune searches over job-spec fields: search spaces (``space``) and trainables (``trainables``)."""
