"""Runs ``ftjax-plan`` (ftjax/commands/plan.py) from a checkout."""

from ftjax.commands.plan import run

if __name__ == "__main__":
    run()
