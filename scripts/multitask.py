"""Runs ``ftjax-multitask`` (ftjax/commands/multitask.py) from a checkout."""

from ftjax.commands.multitask import run

if __name__ == "__main__":
    run()
