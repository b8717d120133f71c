"""Core sub-commands (demo, plan, profile, infer, worker, bench) attached to the root CLI group."""
