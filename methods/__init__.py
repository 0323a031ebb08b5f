"""Method registry: one line per method (``name → "module:Class"``), imported lazily."""

from harness.registry import Registry

METHODS: Registry = Registry("method")
METHODS.add(
    "diffusion_nft",
    "methods.diffusion_nft:DiffusionNFT",
    "DiffusionNFT: forward-process RL on clean samples, CFG-free, any solver",
)
METHODS.add("flow_grpo", "methods.flow_grpo:FlowGRPO", "FlowGRPO: GRPO on Flow-SDE rollouts with per-step log-probs")
