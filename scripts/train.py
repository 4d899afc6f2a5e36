"""Runs ``ftjax-train`` (ftjax/commands/train.py) from a checkout."""

from ftjax.commands.train import run

if __name__ == "__main__":
    run()
