"""Core sub-commands attached to the root CLI group; each area keeps its commands in its own module."""

from coformer.cli import bench, calibrate, demo, plan, run, serve, worker  # noqa: F401 - each registers its commands
