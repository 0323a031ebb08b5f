"""Run by tests/harness/test_fsdp.py under ``accelerate launch`` with the FSDP config (2 gloo CPU processes).

``python -m tests.harness.fsdp_worker OUT SD3_PIPELINE FLUX_PIPELINE``: the tiny DiT (full fine-tuning)
and the tiny SD3 and FLUX pipelines (LoRA). Each run is made twice in one launch, sharded (FSDP) and replicated (the
data-parallel path); every process writes what it saw, with full tensors, to ``OUT/rank<r>.pt``
and the test compares them with one process. Not a test module itself (no ``test_`` prefix).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.bench.sd3_check import Brightness, FixedPrompts
from harness.distributed import Processes, from_environment
from harness.evaluate import EvalSettings
from harness.fsdp import full_tensors, shard_policy
from harness.optim import OptimConfig, Optimization
from harness.policies.flux import FluxLoRAConfig, FluxPolicy, FluxPolicyConfig
from harness.policies.sd3 import SD3LoRAConfig, SD3Policy, SD3PolicyConfig
from harness.policy import Policy
from harness.trainer import LoopConfig, train
from harness.types import Prompt, RewardSpec
from methods import METHODS
from methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from rewards.shapes import ShapesGenEval
from tests.conftest import make_tiny_policy

DEPTH = 2  # two DiT blocks: two inner FSDP units per weight set
BATCH = 4
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle"]
SD3_CFG = SD3PolicyConfig(resolution=16, dtype="fp32", lora=SD3LoRAConfig(rank=4, alpha=8.0))
SD3_PROMPTS = ["a red cube", "two blue balls", "a green cat", "a cat"]


FLUX_CFG = FluxPolicyConfig(resolution=16, dtype="fp32", lora=FluxLoRAConfig(rank=4, alpha=8.0))


def load_sd3(directory: Path) -> SD3Policy:
    torch.manual_seed(0)  # the LoRA A matrices' initialisation
    return SD3Policy.from_pretrained(directory, SD3_CFG, device="cpu")


def load_flux(directory: Path) -> FluxPolicy:
    torch.manual_seed(0)
    return FluxPolicy.from_pretrained(directory, FLUX_CFG, device="cpu")


def step_batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fixed regression batch: x_t, t and the target velocity."""
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(BATCH, *shape, generator=g), torch.randn(BATCH, *shape, generator=g)
    t = torch.rand(BATCH, generator=g)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    return x_t, t, noise - x0


def one_step(processes: Processes, policy: Policy, prompts: list[str]) -> dict[str, object]:
    """One optimizer step of a flow-matching loss on this process's share of the fixed batch."""
    if processes.fsdp:
        shard_policy(policy, processes.device, processes.world_size, processes.reshard_after_forward)
    sync = processes.average_gradients if processes.world_size > 1 and not processes.fsdp else None
    optim = Optimization(policy.trainable_parameters(), OptimConfig(lr=1e-3, grad_clip=1e9), gradient_sync=sync)
    share = processes.shard(BATCH)
    x_t, t, target = (tensor[share] for tensor in step_batch(policy.sample_shape))
    loss = ((policy.velocity(x_t, t, policy.encode(prompts[share])) - target) ** 2).mean()
    optim.backward(loss)
    grad_norm = optim.step()
    with policy.use_weights("old"):  # a second weight set, untouched by the step, must still gather
        v_old = policy.velocity(x_t, t, policy.encode(prompts[share]))
    params = policy.trainable_parameters()
    return {
        "sharded": all(isinstance(p, DTensor) for p in params),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "numel": sum(p.numel() for p in params),
        "loss": processes.gather(loss.detach()[None]).mean().item(),
        "grad_norm": grad_norm,
        "v_old_sum": processes.sum([v_old.double().sum().item()])[0],
        "weights": full_tensors(policy.weight_state("train")),  # type: ignore[attr-defined]
        "ema": full_tensors(optim.ema.state_dict())["shadow"],
    }


def sd3_end_to_end(processes: Processes, directory: Path, out: Path) -> dict[str, object]:
    """One DiffusionNFT iteration on the tiny SD3 pipeline's LoRA, checkpointed; the LoRA file written after."""
    policy = load_sd3(directory)
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=2, images_per_prompt=2)
    tag = "fsdp" if processes.fsdp else "dp"
    result = train(DiffusionNFT, DiffusionNFTConfig(num_steps=2, train_batch_size=4), policy,
                   FixedPrompts(name="tiny", prompts=tuple(SD3_PROMPTS[:3])), Brightness(), loop, OptimConfig(lr=1e-2),
                   progress=False, processes=processes, checkpoint=out / f"sd3_{tag}.pt")  # fmt: skip
    policy.save_lora(out / f"sd3_lora_{tag}_rank{processes.rank}")  # every process gathers (and writes its own)
    return {
        "losses": [row["train/loss"] for row in result.iterations],
        "grad_norms": [row["train/grad_norm"] for row in result.iterations],
        "weights": policy.weight_state("train"),
        "old": policy.weight_state("old"),
    }


def end_to_end(processes: Processes, iterations: int, checkpoint: Path | None) -> dict[str, object]:
    """DiffusionNFT through the shared loop (evaluated before and after), optionally checkpointed."""
    policy = make_tiny_policy(seed=0, depth=DEPTH)
    loop = LoopConfig(
        iterations=iterations, prompts_per_iteration=2, images_per_prompt=2, eval=EvalSettings(num_steps=2)
    )
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    result = train(DiffusionNFT, DiffusionNFTConfig(num_steps=2), policy, bench, ShapesGenEval(), loop,
                   OptimConfig(lr=1e-3), progress=False, processes=processes, checkpoint=checkpoint)  # fmt: skip
    return {
        "losses": [row["train/loss"] for row in result.iterations],
        "reward_means": [row["train/reward_mean"] for row in result.iterations],
        "fwd_equiv": [row["compute/fwd_equiv"] for row in result.iterations],
        "evaluations": [{k: v for k, v in row.items() if k.startswith("eval/")} for row in result.evaluations],
        "resumed_from": result.resumed_from,
        "weights": full_tensors(policy.weight_state("train")),
        "old": full_tensors(policy.weight_state("old")),
    }


class GatedBrightness:
    """Mean pixel value, but a constant 0.5 for the first prompt: its group has zero std (FlowGRPO drops it,
    online DPO with ``drop_tied_groups`` too), so the processes keep different numbers of samples."""

    spec = RewardSpec(name="gated_brightness", version="0", description="test reward", differentiable=True)

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        scores = images.mean(dim=(1, 2, 3)).float()
        constant = torch.tensor([p.text == PROMPTS[0] for p in prompts])
        return torch.where(constant, torch.full_like(scores, 0.5), scores).cpu()


class FirstPrompts(FixedPrompts):
    """Each iteration's training prompts are the first n, in order: the first (constant-reward) group sits on
    process 0 alone."""

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        return [Prompt(text) for text in self.prompts[:n]]


# Every registered method that declares capabilities.fsdp runs, with micro-batches of one sample, so that a process
# keeping fewer samples runs fewer passes unless padded with fillers; 3 prompts x 4 images (whole-group methods:
# 2 x 4, a group per process). OVERRIDES only make a listed method's run cheaper or its filler case sharper; a
# method not listed runs with its defaults (num_steps cut where its config allows).
OVERRIDES: dict[str, dict[str, object]] = {
    "flow_grpo": {"rollout_cfg": 1.0, "train_cfg": 1.0},
    "flow_grpo_fast": {"num_steps": 4, "sde_window_size": 1, "sde_window_range": (0, 2)},
    "awm": {"num_steps": 3, "train_timesteps": 1},
    "online_dpo": {"guidance_scale": 1.0, "drop_tied_groups": True},  # tied groups dropped: pairs differ by process
    "dgpo": {"trunc_steps": 1, "train_timesteps": 2},
    "mix_grpo": {"num_steps": 3},
    # CRD (one group per process, 2 steps) and DanceGRPO (4 samples, 3 steps) leave their last optimizer step with
    # no pass on any process: under FSDP it must still step AdamW on zero gradients, as data-parallel does
    "crd": {"train_timesteps": 2},
    "dance_grpo": {"num_steps": 3},
}
FSDP_METHODS = [name for name in METHODS if METHODS.get(name).capabilities.fsdp]


def method_config(name: str) -> object:
    """The run's config: one-sample micro-batches, few steps, then the method's OVERRIDES."""
    config_cls = METHODS.get(name).Config
    fields = {f.name for f in dataclasses.fields(config_cls)}
    settings = {"train_batch_size": 1, **({"num_steps": 2} if "num_steps" in fields else {}), **OVERRIDES.get(name, {})}
    try:
        return config_cls(**settings)
    except ValueError:  # too few steps for this method's own checks
        return config_cls(**{k: v for k, v in settings.items() if k != "num_steps"})


def method_run(processes: Processes, name: str) -> dict[str, object]:
    """Two iterations of ``name`` through the shared loop on the tiny DiT, no evaluation."""
    method_cls = METHODS.get(name)
    prompts = 2 if method_cls.capabilities.needs_whole_groups else 3
    policy = make_tiny_policy(seed=0, depth=DEPTH)
    loop = LoopConfig(iterations=2, evaluate=False, prompts_per_iteration=prompts, images_per_prompt=4)
    bench = FirstPrompts(name="tiny", prompts=tuple(PROMPTS[:3]))
    result = train(method_cls, method_config(name), policy, bench, GatedBrightness(), loop, OptimConfig(lr=1e-3),
                   progress=False, processes=processes)  # fmt: skip
    return {
        "logs": [{k: v for k, v in row.items() if k.startswith("train/")} for row in result.iterations],
        "training_fwd": processes.sum([result.ledger.forward["training"]])[0],
        "weights": full_tensors(policy.weight_state("train")),
    }


def main(out: Path, sd3_pipeline: Path, flux_pipeline: Path) -> None:
    fsdp = from_environment()
    replicated = dataclasses.replace(fsdp, fsdp=False)
    runs = {"fsdp": fsdp, "dp": replicated}
    report = {
        "rank": fsdp.rank,
        "fsdp": fsdp.fsdp,
        "one_step": {name: one_step(p, make_tiny_policy(0, DEPTH), PROMPTS) for name, p in runs.items()},
        "sd3_one_step": {name: one_step(p, load_sd3(sd3_pipeline), SD3_PROMPTS) for name, p in runs.items()},
        "sd3_end_to_end": {name: sd3_end_to_end(p, sd3_pipeline, out) for name, p in runs.items()},
        "flux_one_step": {name: one_step(p, load_flux(flux_pipeline), SD3_PROMPTS) for name, p in runs.items()},
        "methods": {name: {tag: method_run(p, name) for tag, p in runs.items()} for name in FSDP_METHODS},
        "end_to_end": {
            "fsdp": end_to_end(fsdp, 2, out / "fsdp.pt"),
            "dp": end_to_end(replicated, 2, None),
            # one iteration, then a rerun to two that resumes from the checkpoint, both sharded
            "resumed": (end_to_end(fsdp, 1, out / "resumed.pt"), end_to_end(fsdp, 2, out / "resumed.pt"))[1],
        },
    }
    torch.save(report, out / f"rank{fsdp.rank}.pt")
    fsdp.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
