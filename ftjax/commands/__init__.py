"""The command-line programs, one module each: ``ftjax-train`` is ``ftjax.commands.train:run``
(``python -m ftjax.commands.train``; ``scripts/train.py`` in a checkout), and so on."""
