"""The root ``coformer`` command group, its console and the options every stage shares; command modules attach to it."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from coformer.plugins import load_failures
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
