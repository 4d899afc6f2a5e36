"""Runs ``ftjax-sequential`` (ftjax/commands/sequential.py) from a checkout."""

from ftjax.commands.sequential import run

if __name__ == "__main__":
    run()
