"""The entry point users and their scripts call: ``python -m jobs.launch COMMAND ...``.

The commands live in ``cli/`` (the layer above the searches and the jobs); this module only starts
them, so it is the one module of ``jobs`` that imports upward (setup.cfg's layers contract names it).
"""

from cli.main import cli

if __name__ == "__main__":
    cli()
