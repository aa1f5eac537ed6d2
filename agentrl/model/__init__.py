"""agentrl's model: a compact Qwen3-MoE-compatible causal LM with routing record/replay.

    from agentrl.model import preset, MoEForCausalLM, save_pretrained, load_pretrained, attach_replay
"""

from agentrl.model.checkpoint import load_config, load_pretrained, save_pretrained
from agentrl.model.config import PRESETS, MoEConfig, preset
from agentrl.model.modeling import CausalLMOutput, MoEForCausalLM
from agentrl.model.replay import ReplayMode, RoutingReplay, RoutingReplayError, attach_replay, check_replay_rows

__all__ = [
    "PRESETS", "CausalLMOutput", "MoEConfig", "MoEForCausalLM", "ReplayMode", "RoutingReplay",
    "RoutingReplayError", "attach_replay", "check_replay_rows", "load_config", "load_pretrained",
    "preset", "save_pretrained",
]
