"""Runs ``ftjax-preference`` (ftjax/commands/preference.py) from a checkout."""

from ftjax.commands.preference import run

if __name__ == "__main__":
    run()
