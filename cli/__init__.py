"""The commands: ``python -m jobs.launch COMMAND`` (prune, train, ptq, tune, export, verify, status, report,
results). The top layer: it imports the searches (``sweeps``), the jobs (``jobs``), the report
(``analysis``) and the library (``compress``); nothing imports it but the entry point ``jobs/launch.py``."""
