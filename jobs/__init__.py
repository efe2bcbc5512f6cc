"""Launchers (``python -m jobs.launch``) and the module-level job functions they submit."""
