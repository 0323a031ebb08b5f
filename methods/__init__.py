"""Method registry: one line per method (``name → class``), checked by mypy against the Method protocol."""

from harness.registry import Registry
from methods.awm import AWM
from methods.base import Method
from methods.diffusion_nft import DiffusionNFT
from methods.draft import DRaFT
from methods.flow_grpo import FlowGRPO
from methods.flow_grpo_fast import FlowGRPOFast
from methods.online_dpo import OnlineDPO
from methods.raft import RAFT
from methods.rwr import RWR

METHODS: Registry[type[Method]] = Registry("method")
METHODS.add("diffusion_nft", DiffusionNFT, "DiffusionNFT: forward-process RL on clean samples, CFG-free, any solver")
METHODS.add("flow_grpo", FlowGRPO, "FlowGRPO: GRPO on Flow-SDE rollouts with per-step log-probs")
METHODS.add("raft", RAFT, "RAFT: online rejection sampling, flow matching on each group's top-k, CFG-free")
METHODS.add("rwr", RWR, "Flow-RWR: flow matching weighted by raw rewards (official) or a group softmax")
METHODS.add("online_dpo", OnlineDPO, "Online Flow-DPO: Diffusion-DPO on best vs worst, refreshed reference")
METHODS.add("awm", AWM, "AWM: advantage-weighted flow matching with ratio clip, KL and EMA-KL")
METHODS.add("flow_grpo_fast", FlowGRPOFast, "FlowGRPO-Fast: SDE and GRPO training only inside a random window of steps")
METHODS.add("draft", DRaFT, "DRaFT-K / DRaFT-LV / ReFL: backprop a differentiable reward through the last steps")

# Issue 17 part B: GRPO-Guard, DGPO, CRD
from methods.crd import CRD  # noqa: E402
from methods.dgpo import DGPO  # noqa: E402
from methods.grpo_guard import GRPOGuard  # noqa: E402

METHODS.add("grpo_guard", GRPOGuard, "GRPO-Guard: FlowGRPO with RatioNorm and 1/Δt gradient reweighting (Flow-SDE)")
METHODS.add("dgpo", DGPO, "DGPO: group-level DPO on ODE samples, PPO-style clip, frozen-base reference")
METHODS.add("crd", CRD, "CRD: centred reward distillation on clean samples, old/sampler snapshots, adaptive KL")

# Issue 17 part A: DanceGRPO, MixGRPO (+ Flash)
from methods.dance_grpo import DanceGRPO  # noqa: E402
from methods.mix_grpo import MixGRPO  # noqa: E402

METHODS.add("dance_grpo", DanceGRPO, "DanceGRPO: GRPO on Dance-SDE rollouts, a random subset of steps per sample")
METHODS.add("mix_grpo", MixGRPO, "MixGRPO: SDE and GRPO only in a sliding window of steps, ODE elsewhere (+ Flash)")
