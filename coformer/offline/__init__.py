"""Offline stages, run before deployment: profile, predict, evaluate, search, decompose, calibrate, package."""
