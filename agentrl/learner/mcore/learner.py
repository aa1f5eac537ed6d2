"""The megatron-core learner: TorchLearner's update, computed by a megatron-core GPTModel.

Owns: `MegatronLearner`, the same public interface as `TorchLearner` (`train_step`, `weights`,
`version`, `cfg`, `model`, `opt`, `sched`, `ema`, `gen`), so the runtime, checkpoints and engines
cannot tell the two apart. Does not own: the update itself. `train_step` is TorchLearner's own code
(ingestion, advantages, the old-policy pass with R2 recording / R3 replay, corrections from
agentrl.algo, mini / micro batches, AdamW, clipping, schedule, EMA); only the forward is replaced,
so both learners compute the same losses from the same formulas by construction.

`model` is `McoreCausalLM` (model.py): its parameters are megatron's (what AdamW steps), its
`state_dict()` / `load_state_dict()` speak HF names (what checkpoints, EMA and engines use).
Routing: `hook` is `McoreRoutingReplay` (replay.py), megatron's RouterReplay per router:
    off : free routing (the routers' choice is still captured for the disagreement metrics);
    R3  : REPLAY_FORWARD with the engine's rows, aligned to the packed / padded token order;
    R2  : RECORD in the old-policy pass, then REPLAY_FORWARD of those rows in every update.
A reference model (kl_coef > 0) is an agentrl MoEForCausalLM, run by TorchLearner's forward.
"""

from __future__ import annotations

import contextlib

import torch

from agentrl.learner.batch import ModelBatch, target_logprobs
from agentrl.learner.learner import LearnerConfig, TorchLearner, lr_lambda
from agentrl.learner.mcore.model import McoreCausalLM, McoreParallel
from agentrl.model.modeling import MoEForCausalLM
from agentrl.routing import RoutingLayout


class MegatronLearner(TorchLearner):
    def __init__(self, model: MoEForCausalLM, cfg: LearnerConfig | None = None,
                 ref_model: torch.nn.Module | None = None, parallel: McoreParallel = McoreParallel()) -> None:
        """`model` supplies the architecture and the starting weights (HF names); it is not kept."""
        if parallel != McoreParallel():
            raise NotImplementedError("MegatronLearner runs world size 1; tensor / expert / pipeline parallel "
                                      "training is not implemented (see README, megatron-core backend)")
        self.cfg = cfg or LearnerConfig()
        gpu = torch.cuda.is_available()
        if self.cfg.device.startswith("cuda") and not gpu:
            raise ValueError(f"learner.device={self.cfg.device}, but this process sees no GPU")
        if self.cfg.device == "cpu" and gpu:  # megatron-core builds on the current GPU whenever one is visible
            raise ValueError("learner.device=cpu, but this process sees a GPU, where megatron-core would build the "
                             "model: set learner.device=cuda, or hide the GPUs (CUDA_VISIBLE_DEVICES=)")
        if gpu and torch.device(self.cfg.device).index is not None:  # cuda:N; plain cuda = the current GPU
            torch.cuda.set_device(torch.device(self.cfg.device))
        if self.cfg.dtype == "bfloat16" and not gpu:
            raise ValueError("dtype=bfloat16 is not supported by the megatron-core backend on CPU: its linear layers "
                             "register autocast for CUDA only (megatron/core/tensor_parallel/layers.py:68), so a CPU "
                             "autocast backward mixes dtypes; use dtype=float32 (or learner.backend=torch)")
        mcore = McoreCausalLM(model.config, parallel)
        mcore.load_state_dict(model.state_dict())
        self.model = mcore.float().train()
        self.ref_model = ref_model.float().eval() if ref_model is not None else None
        if self.cfg.kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.hook = mcore.routing_replay
        self.layout = RoutingLayout.from_config(model.config) if self.hook is not None else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, betas=self.cfg.betas,
                                     weight_decay=self.cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.cfg.lr_schedule, self.cfg.warmup_steps, self.cfg.total_steps))
        self.ema = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    if self.cfg.ema_decay is not None else None)
        self.version = 0
        self.gen = torch.Generator().manual_seed(self.cfg.seed)

    def _forward(self, batch: ModelBatch, rows_mode: str, model=None, aux: bool = False):
        if model is not None and model is not self.model:  # the reference model: agentrl's torch forward
            return super()._forward(batch, rows_mode, model=model, aux=aux)
        device = next(self.model.parameters()).device.type  # "cpu" here; the GPU where megatron put the model
        ctx = (torch.autocast(device, dtype=torch.bfloat16) if self.cfg.dtype == "bfloat16"
               else contextlib.nullcontext())
        if self.hook is not None and rows_mode == "replay" and batch.routing is not None:
            routing = self.hook.replay(batch.routing, batch.routing_mask)
        elif self.hook is not None and rows_mode == "record":
            routing = self.hook.record()
        else:
            routing = contextlib.nullcontext()
        with ctx, routing:
            out = self.model(batch.input_ids, attention_mask=batch.attention_mask, segment_ids=batch.segment_ids,
                             return_aux_loss=aux, token_weights=batch.token_weights if aux else None)
        logp, ent = target_logprobs(out.logits, batch)
        return logp, ent, out.aux_loss
