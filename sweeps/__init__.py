"""Ray Tune searches over job-spec fields: search spaces (``space``) and the search itself (``search``)."""
