"""The command-line tools, importable: each module has ``main(argv=None)`` (raises :class:`UserError` for what a
user can cause) and ``cli()`` (the console script: one-line errors, an exit code).

The top layer: an app may import any part of the project, and nothing of the project imports an app.
``tools/*.py`` in a checkout are three-line shims over these modules; an installed package runs them as the
console scripts declared in setup.cfg (``gdet-detect``, ``gdet-benchmark``, ...).
"""
