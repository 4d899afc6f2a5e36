"""Runs ``ftjax-incontext`` (ftjax/commands/incontext.py) from a checkout."""

from ftjax.commands.incontext import run

if __name__ == "__main__":
    run()
