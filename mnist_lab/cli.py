"""``mnist-lab COMMAND [overrides]``: the console script, one subcommand per ``python -m mnist_lab.COMMAND``
(``train``, ``evaluate``, ``predict``, ``export``), with the same overrides and exit codes."""

import importlib
import sys

COMMANDS = ("train", "evaluate", "predict", "export")


def main(argv: list[str] | None = None) -> None:
    """Run ``mnist_lab.<command>.main`` with the remaining arguments; no command, ``-h`` or an unknown
    one prints the usage (exit code 0 for help, 2 otherwise)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        helped = argv[:1] in (["-h"], ["--help"])
        print(f"usage: mnist-lab {{{','.join(COMMANDS)}}} [overrides ...], as python -m mnist_lab.<command> "
              "(mnist-lab train --help shows the config)", file=sys.stdout if helped else sys.stderr)
        sys.exit(0 if helped else 2)
    sys.argv = [f"mnist-lab {argv[0]}", *argv[1:]]  # Hydra reads the overrides from sys.argv
    importlib.import_module(f"mnist_lab.{argv[0]}").main()
