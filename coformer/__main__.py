"""``python -m coformer``: the same as the ``coformer`` command."""

from coformer.cli import main

main()
