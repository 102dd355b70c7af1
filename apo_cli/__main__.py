"""``python -m apo_cli`` (and ``torchrun -m apo_cli``): the `apo` command."""

from apo_cli.runtime import signals

signals.install()  # first: a Ctrl-C while typer or torch imports gives one line (apo_cli/runtime/signals.py)

from apo_cli.main import main  # noqa: E402

main()
