"""agentrl: asynchronous RL for LLM agents, MoE-first (routing rows + Rollout Routing Replay)."""

__version__ = "0.1.0"
