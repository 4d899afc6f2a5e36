"""Runs ``ftjax-sweep`` (ftjax/commands/sweep.py) from a checkout."""

from ftjax.commands.sweep import run

if __name__ == "__main__":
    run()
