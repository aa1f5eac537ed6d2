"""The megatron-core learner backend (`learner.backend: megatron`).

model.py    MoEConfig -> megatron-core GPTModel (local spec), process groups, the HF-named wrapper
convert.py  HF <-> megatron-core weight names, both ways; expert / pipeline / tensor-parallel shards
replay.py   R2 / R3 through megatron-core's RouterReplay
learner.py  MegatronLearner: TorchLearner's update with the megatron forward
The CPU compatibility shim lives in agentrl.learner.megatron_shim (applied only without a GPU).
"""

from agentrl.learner.mcore.learner import MegatronLearner
from agentrl.learner.mcore.model import McoreCausalLM, McoreParallel

__all__ = ["McoreCausalLM", "McoreParallel", "MegatronLearner"]
