"""The ``coformer`` command line. Plugins add commands through the ``register_commands`` hook."""

from __future__ import annotations

import sys

import click

from coformer.cli.app import cli, console
from coformer.plugins import get_plugin_manager


def build_cli() -> click.Group:
    """The root group with every plugin's commands added."""
    from coformer.cli import commands  # noqa: F401 - registers the core commands on `cli`

    get_plugin_manager().hook.register_commands(cli=cli)
    return cli


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (names, files, plans): shown as one clear message, not a traceback."""
    from coformer.artifacts import ArtifactError
    from coformer.data import DatasetError
    from coformer.plan_document import PlanDocumentError
    from coformer.registry import UnknownPluginError
    from coformer.spec import ConstraintError

    return (UnknownPluginError, ConstraintError, ArtifactError, DatasetError, PlanDocumentError, FileNotFoundError)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``coformer`` script."""
    try:
        build_cli()(args=argv if argv is not None else sys.argv[1:], prog_name="coformer")
    except _user_errors() as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
