"""Runs ``ftjax-eval`` (ftjax/commands/evaluate.py) from a checkout."""

from ftjax.commands.evaluate import run

if __name__ == "__main__":
    run()
