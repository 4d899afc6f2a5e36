"""The shipped config files: ``--config=NAME`` names ``ftjax/configs/NAME.py`` (``configs/`` at the
top of a checkout links here). Each is a Python file with ``get_config(arg)`` (+ ``sweep()``)."""
