"""The ``cdp`` command line: one module per verb (``<verb>_cmd.py``), dispatched by ``main``.

Each verb module exposes ``add_parser(subparsers)``, which registers the verb and sets
``run`` as its handler, and ``run(args) -> int``. Handlers raise ``cdp.errors`` exceptions for
every failure; ``cdp.cli.main`` alone turns them into messages and exit codes.
"""
