"""Core sub-commands attached to the root CLI group; each area keeps its commands in its own module."""

from coformer import cli_demo  # noqa: F401
from coformer import cli_worker  # noqa: F401
from coformer import cli_bench  # noqa: F401
from coformer import cli_plan  # noqa: F401
from coformer import cli_calibrate  # noqa: F401
