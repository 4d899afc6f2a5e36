"""Runs ``ftjax-prepare`` (ftjax/commands/prepare_data.py) from a checkout."""

from ftjax.commands.prepare_data import run

if __name__ == "__main__":
    run()
