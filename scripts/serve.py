"""Runs ``ftjax-serve`` (ftjax/commands/serve.py) from a checkout."""

from ftjax.commands.serve import run

if __name__ == "__main__":
    run()
