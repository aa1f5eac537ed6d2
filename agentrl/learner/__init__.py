"""Learners: the torch learner (and later megatron-core), both replaying routing (R2/R3)."""
