"""The ``kvmsim`` command line (placeholder until the scenario issue lands)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmsim")
def cli() -> None:
    """kvmsim: how KVM maps guest memory, legacy (v6.12) vs series (v6.13)."""


def main() -> None:
    cli()
