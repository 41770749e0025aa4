"""The base layer: what every other layer shares, importing nothing else of the project and no torch.

- :mod:`.boxes`: the box convention and every format conversion (numpy).
- :mod:`.errors`: :class:`UserError`, one line a user can act on; :mod:`.cli`: ``run_tool`` and
  ``ToolParser`` for tools; :mod:`.options`: the checked types of every command-line option.
- :mod:`.io`: reading images into RGB ``uint8`` arrays; :mod:`.vocab`: class vocabularies.
- :mod:`.files`: the one atomic write, output paths checked before work, text lists read strictly;
  :mod:`.defaults`: every shared default and constant.
- :mod:`.checkpoint`: checkpoint paths and JSON configs (torch only inside the weight readers/writers).
"""
