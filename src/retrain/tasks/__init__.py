"""Small self-contained tasks: prompt generators with their reward functions."""
