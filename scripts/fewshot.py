"""Runs ``ftjax-fewshot`` (ftjax/commands/fewshot.py) from a checkout."""

from ftjax.commands.fewshot import run

if __name__ == "__main__":
    run()
