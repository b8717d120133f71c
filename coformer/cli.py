"""The ``coformer`` command line. Plugins add commands through the ``register_commands`` hook."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from coformer.plugins import get_plugin_manager, load_failures
from coformer.registry import list_plugins

console = Console()

#: ``--data`` help, shared by every stage that reads a data set.
DATA_HELP = ("Data set: a registered name (`coformer plugins` lists them) or a URI such as "
             "csv:PATH?text=COL&label=COL, jsonl:PATH?text=KEY&label=KEY, imagefolder:DIR "
             "(default: the data set installed as the default for the backbone's modality).")


@click.group()
@click.version_option(package_name="coformer")
def cli() -> None:
    """CoFormer: decompose a transformer across heterogeneous devices, calibrate, deploy, aggregate."""


@cli.command("plugins")
def plugins_cmd() -> None:
    """List every plugin: kind, name, providing distribution and version."""
    table = Table(title="CoFormer plugins")
    for col in ("kind", "name", "plugin module", "distribution", "version"):
        table.add_column(col)
    for info in list_plugins():
        table.add_row(info.kind, info.name, info.plugin, info.distribution, info.version)
    console.print(table)
    for f in load_failures():
        console.print(f"[red]failed to load[/red] {f.name} ({f.value}, from {f.distribution}): {f.error}")


def build_cli() -> click.Group:
    """The root group with every plugin's commands added."""
    from coformer import commands  # noqa: F401 - registers the core commands on `cli`

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
