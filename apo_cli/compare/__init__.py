"""`apo compare`: several arms (objectives, or twin recipes) × several seeds, each an ordinary run
directory, and a report that says whether the differences between the arms are larger than the
differences between seeds.

- :mod:`apo_cli.compare.plan`: the arms and seeds from the command line (``--objectives``, recipes,
  ``--set ARM:key=value``), each arm's recipe validated before anything trains, the manifest
  ``compare.json`` that names them for the report.
- :mod:`apo_cli.compare.runner`: the runs, one ``python -m apo_cli train`` process each (``--jobs``
  at once, the cores shared out), finished runs skipped and interrupted ones resumed.
- :mod:`apo_cli.compare.report`: per-run and per-arm figures, paired bootstrap intervals of each
  arm's difference from the first, the verdicts, the table, CSV and JSON.
- :mod:`apo_cli.compare.charts`: the overlaid mean curves in the terminal (uniplot) and as a PNG.

The layout on disk::

    runs/<name>-compare/
      compare.json             the manifest: arms (name, objective, recipe, dropped fields, --set), seeds
      recipes/<arm>-s<seed>.yaml   the recipe each run was started with (`apo train` it by hand to redo one)
      logs/<arm>-s<seed>.log   each run's output when --jobs > 1
      <arm>-s<seed>/           an ordinary run directory (apo eval, apo inspect-alpha, apo train --resume)
"""
