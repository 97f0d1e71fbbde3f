"""Reward functions: graders of model answers (host side)."""
