"""Pure metric functions for the downstream tasks, exactly as the papers define them.

Every function takes plain Python lists / tensors of already-gathered outputs (all ranks, padding
removed) and returns fractions in [0, 1]; tables print them as percentages.
"""
