"""Runs ``ftjax-check-leakage`` (ftjax/commands/check_leakage.py) from a checkout."""

from ftjax.commands.check_leakage import run

if __name__ == "__main__":
    run()
