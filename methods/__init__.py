"""Method registry: one line per method (``name → "module:Class"``), imported lazily."""

from harness.registry import Registry

METHODS: Registry = Registry("method")
METHODS.add(
    "diffusion_nft",
    "methods.diffusion_nft:DiffusionNFT",
    "DiffusionNFT: forward-process RL on clean samples, CFG-free, any solver",
)
METHODS.add("flow_grpo", "methods.flow_grpo:FlowGRPO", "FlowGRPO: GRPO on Flow-SDE rollouts with per-step log-probs")
METHODS.add(
    "raft", "methods.raft:RAFT", "RAFT: online rejection sampling, flow matching on each group's top-k, CFG-free"
)
METHODS.add("rwr", "methods.rwr:RWR", "Flow-RWR: flow matching weighted by raw rewards (official) or a group softmax")
METHODS.add(
    "online_dpo", "methods.online_dpo:OnlineDPO", "Online Flow-DPO: Diffusion-DPO on best vs worst, refreshed reference"
)
METHODS.add("awm", "methods.awm:AWM", "AWM: advantage-weighted flow matching with ratio clip, KL and EMA-KL")
METHODS.add(
    "flow_grpo_fast",
    "methods.flow_grpo_fast:FlowGRPOFast",
    "FlowGRPO-Fast: SDE and GRPO training only inside a random window of steps, ODE elsewhere",
)
METHODS.add(
    "draft",
    "methods.draft:DRaFT",
    "DRaFT-K / DRaFT-LV / ReFL: backprop a differentiable reward through the last sampling steps",
)
