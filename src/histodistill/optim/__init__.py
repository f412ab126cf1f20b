"""Optimisers, learning-rate schedules and EMA updates, shared by the methods and MIL training."""
