"""The training runtime: the RL loop, its actors, and what users see while it runs."""
