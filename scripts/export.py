"""Runs ``ftjax-export`` (ftjax/commands/export.py) from a checkout."""

from ftjax.commands.export import run

if __name__ == "__main__":
    run()
