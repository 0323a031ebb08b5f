"""What the diffusers policies (``sd3.py``, ``flux.py``) share: θ / old LoRA adapters on one frozen transformer.

* :class:`LoRAAdapters`: two peft LoRA adapters on a diffusers transformer, ``default`` (θ, trained) and
  ``old`` (the sampling policy), with the base model (adapters disabled) as the reference, as the official
  DiffusionNFT (``train_nft_sd3.py``) and FlowGRPO (``train_sd3.py``, ``train_flux.py``) code. The LoRA
  parameters are fp32 master weights; LoRA files are the ``pytorch_lora_weights.safetensors`` that the
  pipeline's ``load_lora_weights`` reads, with the peft config (r, α, targets) in the file's metadata.
* :class:`PromptCache`: the text encoders are frozen, so prompt embeddings are cached on the CPU, least
  recently used first out beyond a limit; ``""`` (CFG's negative prompt) is never dropped.
* dtype names, frozen-module placement, the VAE decode ``latents / scaling_factor + shift_factor`` →
  ``[0, 1]`` (``VaeImageProcessor.postprocess``), and the EMA weights of a trainer checkpoint.
* LoRA files straight from a trainer checkpoint, with no model loaded: :func:`export_checkpoint_lora` (θ or
  its EMA) and :func:`export_run_loras` (both, as ``lora/`` and ``lora_ema/``: what ``diffrl run`` leaves in
  every SD3/FLUX cell and ``diffrl export-lora`` writes).

Under FSDP (:mod:`harness.fsdp`) :meth:`LoRAAdapters.fully_shard` shards the transformer per block with
the base weights and both adapters together; the LoRA tensors read out of it are then gathered full
tensors (every process must call), and those written into it are cut to this process's shard.

Each policy keeps its own prompt encoding, latent layout, timestep scale and schedule.
"""

from __future__ import annotations

import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
from torch import Tensor, nn

from harness.fsdp import full_tensor, local_like
from harness.policy import WEIGHT_SETS, WeightSet

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTypeName = Literal["fp32", "fp16", "bf16"]
TRAIN_ADAPTER, OLD_ADAPTER = "default", "old"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
# The diffusers pipeline whose save_lora_weights / load_lora_weights a model kind's LoRA files are for.
PIPELINES: dict[str, str] = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}

# (prompts) -> per-prompt tensors, batch first (e.g. token embeddings (B, L, D) and pooled (B, P)).
PromptEncoder = Callable[[list[str]], tuple[Tensor, ...]]


class LoRASettings(Protocol):
    """The fields of a policy's LoRA config (``SD3LoRAConfig``, ``FluxLoRAConfig``)."""

    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def target_modules(self) -> tuple[str, ...]: ...
    @property
    def init_lora_weights(self) -> Literal["gaussian", True]: ...


def peft_lora_config(lora: LoRASettings) -> Any:
    """peft ``LoraConfig`` (no dropout); ``init_lora_weights`` sets B = 0 either way, so θ starts at the base."""
    from peft import LoraConfig

    # peft annotates lora_alpha as int but only ever divides by it: pass an integral α as int and keep a
    # fractional one as the float it is (the cast only quiets the annotation).
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else cast(int, lora.alpha)
    return LoraConfig(
        r=lora.rank,
        lora_alpha=alpha,
        target_modules=list(lora.target_modules),
        init_lora_weights=lora.init_lora_weights,
        lora_dropout=0.0,
    )


def resolve_dtype(name: str, field: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def train_dtype(name: str, config_name: str) -> torch.dtype:
    """``<config_name>.dtype``: fp16 is refused, since the LoRA gradients would go unscaled."""
    if name == "fp16":
        raise ValueError(
            f"{config_name}.dtype='fp16' is not supported for training: harness/optim.py has no loss scaling "
            "(GradScaler), so fp16 activation gradients can underflow to zero; use dtype='bf16' (same exponent "
            "range as fp32, no scaling needed) or 'fp32'"
        )
    return resolve_dtype(name, f"{config_name}.dtype")


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Frozen ``module`` on ``device`` in ``dtype`` (cast only when needed: diffusers warns on every cast)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module.to(device).requires_grad_(False)


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` (frozen weights in ``dtype``, fp32 LoRA); none in fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def decode_latents(
    vae: nn.Module, latents: Tensor, device: torch.device, dtype: torch.dtype, batch_size: int
) -> Tensor:
    """VAE latents (B, C, h, w) → images (B, 3, H, W) in [0, 1], fp32 on the input's device.

    Differentiable in ``latents`` (direct reward backprop, DRaFT / ReFL, backpropagates through it); the VAE's
    weights are frozen, so latents without a graph (every sampled x0) build none.

    ``latents / scaling_factor + shift_factor`` through the VAE, then ``[−1, 1] → [0, 1]``, as
    ``StableDiffusion3Pipeline`` / ``FluxPipeline.__call__`` and ``VaeImageProcessor.postprocess``.
    """
    config: Any = vae.config  # diffusers AutoencoderKL: config attributes and decode() unseen by nn.Module's typing
    scaling, shift = config.scaling_factor, config.shift_factor or 0.0
    images = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size].to(device, dtype) / scaling + shift
        image = cast(Any, vae).decode(z, return_dict=False)[0]
        images.append(((image.float() + 1) / 2).clamp(0, 1).to(latents.device))
    return torch.cat(images)


def checkpoint_ema_shadow(path: str | Path) -> list[Tensor]:
    """The EMA weights saved in a :func:`harness.trainer.train` checkpoint, in ``trainable_parameters()`` order.

    ``train(..., checkpoint=path)`` writes ``optim.state_dict()`` there, whose ``ema`` entry holds
    ``shadow``: pass the result to the policy's ``save_lora`` as ``tensors``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)  # the trainer's own file (numpy RNG state)
    try:
        shadow = payload["optim"]["ema"]["shadow"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a harness.trainer checkpoint: it has no optim → ema → shadow entry") from None
    return [tensor.float() for tensor in shadow]


class PromptCache(OrderedDict[str, tuple[Tensor, ...]]):
    """Prompt → per-prompt CPU tensors, oldest use first; beyond ``limit`` prompts the least recent go ("" stays)."""

    def __init__(self, limit: int | None, config_name: str) -> None:
        super().__init__()
        if limit is not None and limit < 1:
            raise ValueError(f"{config_name}.max_cached_prompts must be >= 1 or None, got {limit}")
        self.limit = limit

    def lookup(self, prompts: Sequence[str], encoder: PromptEncoder) -> list[Tensor]:
        """Stacked CPU tensors for ``prompts`` (duplicates encoded once); new prompts go through ``encoder``."""
        rows: dict[str, tuple[Tensor, ...]] = {}
        missing = []
        for prompt in dict.fromkeys(prompts):
            if prompt in self:
                self.move_to_end(prompt)
                rows[prompt] = self[prompt]
            else:
                missing.append(prompt)
        if missing:
            outputs = [tensor.detach().cpu() for tensor in encoder(missing)]
            for i, prompt in enumerate(missing):  # clone: a row view would keep the whole batch alive
                rows[prompt] = self[prompt] = tuple(tensor[i].clone() for tensor in outputs)
            self._evict()
        width = len(rows[prompts[0]])
        return [torch.stack([rows[p][k] for p in prompts]) for k in range(width)]

    def _evict(self) -> None:
        if self.limit is None:
            return
        evictable = [prompt for prompt in self if prompt != ""]  # oldest use first
        for prompt in evictable[: max(0, len(evictable) - self.limit)]:
            del self[prompt]


class LoRAAdapters:
    """θ ("default") and old LoRA adapters on ``transformer`` (fp32; old starts as a copy of θ); the base is ref.

    ``owner`` (the policy's class name) and ``type(lora).__name__`` name things in error messages.
    """

    def __init__(self, transformer: nn.Module, lora: LoRASettings, *, owner: str) -> None:
        self.transformer, self.lora, self.owner = transformer, lora, owner
        self.config_name = type(lora).__name__
        names = [n for n, _ in transformer.named_modules()]
        unmatched = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ValueError(
                f"{self.config_name}.target_modules {unmatched} match no module of {type(transformer).__name__} "
                f"(peft matches name suffixes, e.g. 'attn.to_q')"
            )
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            peft_model: Any = transformer  # diffusers' PeftAdapterMixin methods, unseen by nn.Module's typing
            for name in (TRAIN_ADAPTER, OLD_ADAPTER):
                peft_model.add_adapter(peft_lora_config(lora), adapter_name=name)
        params = dict(transformer.named_parameters())
        self.train_names = sorted(n for n in params if f".{TRAIN_ADAPTER}." in n and "lora_" in n)
        self.old_names = [n.replace(f".{TRAIN_ADAPTER}.", f".{OLD_ADAPTER}.") for n in self.train_names]
        for name in (*self.train_names, *self.old_names):
            params[name].data = params[name].data.float()  # fp32 master weights (peft casts to the base dtype)
        self.train_params = [params[n] for n in self.train_names]
        self.old_params = [params[n] for n in self.old_names]
        self.active: WeightSet = "train"
        self._select("train")
        self.update_old(0.0)

    def _select(self, which: WeightSet) -> None:
        peft_model: Any = self.transformer
        if which == "ref":
            peft_model.disable_adapters()
        else:
            peft_model.enable_adapters()
            peft_model.set_adapter(TRAIN_ADAPTER if which == "train" else OLD_ADAPTER)
        # peft toggles requires_grad on every switch; θ must stay trainable (autograd drops the gradient of a
        # leaf whose requires_grad is False at backward time) and old must never be.
        for p in self.train_params:
            p.requires_grad_(True)
        for p in self.old_params:
            p.requires_grad_(False)

    @contextmanager
    def use(self, which: WeightSet) -> Iterator[None]:
        """θ ("train": adapter ``default``), the sampling policy ("old": adapter ``old``) or the base ("ref")."""
        if which not in WEIGHT_SETS:
            raise ValueError(f"weight set must be one of {WEIGHT_SETS}, got {which!r}")
        previous = self.active
        self._select(which)
        self.active = which
        try:
            yield
        finally:
            self._select(previous)
            self.active = previous

    @torch.no_grad()
    def update_old(self, eta: float) -> None:
        """``old ← η·old + (1 − η)·θ`` on the LoRA parameters; ``eta = 0`` copies θ."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        for old, new in zip(self.old_params, self.train_params, strict=True):
            old.mul_(eta).add_(new.detach(), alpha=1.0 - eta)

    def fully_shard(self, shard: Callable[[nn.Module], object], blocks: Sequence[nn.Module]) -> None:
        """FSDP: ``shard`` each transformer block, then the transformer (the rest: embeddings, norms, output).

        Sharding swaps in DTensor parameters, so θ's and old's lists are re-read (in place: policies alias them).
        """
        for block in blocks:
            shard(block)
        shard(self.transformer)
        params = dict(self.transformer.named_parameters())
        self.train_params[:] = [params[n] for n in self.train_names]
        self.old_params[:] = [params[n] for n in self.old_names]
        self._select(self.active)

    # ---------------------------------------------------------------------------------------- tensors
    def keys(self, which: Literal["train", "old"]) -> list[str]:
        """peft's adapter-free keys of θ's or old's LoRA, in parameter order."""
        adapter, names = (TRAIN_ADAPTER, self.train_names) if which == "train" else (OLD_ADAPTER, self.old_names)
        return [n.replace(f".{adapter}.", ".") for n in names]

    def state_dict(
        self, which: Literal["train", "old"] = "train", tensors: Sequence[Tensor] | None = None
    ) -> dict[str, Tensor]:
        """θ's or old's LoRA with peft's adapter-free keys (``…to_q.lora_A.weight``), CPU fp32 copies.

        ``tensors`` replaces θ's values, in ``train_params`` order (e.g. ``optim.ema.shadow``). Under FSDP the
        shards are gathered: every process must call this.
        """
        if which not in ("train", "old"):
            raise ValueError(f"which must be 'train' or 'old' (ref has no LoRA), got {which!r}")
        values: Sequence[Tensor] = self.train_params if which == "train" else self.old_params
        if tensors is not None:
            if which != "train" or len(tensors) != len(values):
                raise ValueError(
                    f"tensors must align with trainable_parameters() ({len(values)} tensors, which='train'), "
                    f"got {len(tensors)} with which={which!r}"
                )
            for given, param in zip(tensors, values, strict=True):
                if given.shape != param.shape:
                    raise ValueError(f"tensor shape {tuple(given.shape)} != parameter shape {tuple(param.shape)}")
            values = list(tensors)
        return {
            key: full_tensor(v.detach()).to("cpu", torch.float32, copy=True)
            for key, v in zip(self.keys(which), values, strict=True)
        }

    @torch.no_grad()
    def load_state_dict(self, which: WeightSet, state: dict[str, Tensor]) -> None:
        """Copy LoRA tensors (keys as :meth:`state_dict`, full tensors) into θ ("train") or old."""
        if which == "ref":
            raise ValueError("which must be 'train' or 'old' (ref has no LoRA), got 'ref'")
        expected = self.keys(which)
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(
                f"LoRA keys do not match this policy's {self.config_name} (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); build the policy with the LoRA's target_modules"
            )
        params = self.train_params if which == "train" else self.old_params
        for key, param in zip(expected, params, strict=True):
            if state[key].shape != param.shape:
                raise ValueError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)} "
                    f"({self.config_name}.rank={self.lora.rank})"
                )
            param.copy_(local_like(state[key].to(param.dtype), param))  # this process's shard under FSDP

    # ---------------------------------------------------------------------------------------- files
    def save(
        self, directory: str | Path, pipeline_cls: Any, which: Literal["train", "old"] = "train",
        tensors: Sequence[Tensor] | None = None,
    ) -> Path:  # fmt: skip
        """Write ``pytorch_lora_weights.safetensors`` with ``pipeline_cls.save_lora_weights`` (+ rank/α metadata).

        Without the metadata diffusers' loader would assume α = r and scale the update by 1, not α/r.
        """
        return save_lora_file(directory, pipeline_cls, self.state_dict(which, tensors), self.lora)

    def load(self, directory: str | Path, pipeline_cls: Any, which: Literal["train", "old"] = "train") -> None:
        """Load a file written by :meth:`save` (read with ``pipeline_cls.lora_state_dict``) into θ or old."""
        state, metadata = pipeline_cls.lora_state_dict(str(directory), return_lora_metadata=True)
        prefix = "transformer."
        saved = {k: (metadata or {}).get(prefix + k) for k in ("r", "lora_alpha")}
        if saved["r"] is None or saved["lora_alpha"] is None:
            raise ValueError(
                f"{directory}: the LoRA file has no rank/alpha metadata; write it with {self.owner}.save_lora"
            )
        if (int(saved["r"]), float(saved["lora_alpha"])) != (self.lora.rank, float(self.lora.alpha)):
            raise ValueError(
                f"{directory}: LoRA has r={saved['r']}, alpha={saved['lora_alpha']} but {self.config_name} has "
                f"rank={self.lora.rank}, alpha={self.lora.alpha}; build the policy with the file's values"
            )
        self.load_state_dict(which, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


# ---------------------------------------------------------------------------------------- LoRA files
def save_lora_file(directory: str | Path, pipeline_cls: Any, state: dict[str, Tensor], lora: LoRASettings) -> Path:
    """``directory/pytorch_lora_weights.safetensors`` by ``pipeline_cls.save_lora_weights``, with the peft config
    (r, α, targets) in the file's metadata. Written in a folder beside it and moved into place, so a kill never
    leaves half a file; nothing else in ``directory`` is touched."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        pipeline_cls.save_lora_weights(
            staging, transformer_lora_layers=state,
            transformer_lora_adapter_metadata=peft_lora_config(lora).to_dict(),
        )  # fmt: skip
        (staging / LORA_FILE).replace(directory / LORA_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def pipeline_class(kind: str) -> Any:
    """The diffusers pipeline class of model kind ``kind`` (``sd3``, ``flux``), for its LoRA files."""
    if kind not in PIPELINES:
        raise ValueError(f"model kind {kind!r} has no LoRA files; LoRA is trained for {', '.join(PIPELINES)}")
    import diffusers

    return getattr(diffusers, PIPELINES[kind])


def checkpoint_lora_states(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """θ's LoRA and its EMA from a :func:`harness.trainer.train` checkpoint, both with peft's adapter-free keys.

    The checkpoint holds θ as ``weights → train`` (keys in ``trainable_parameters()`` order) and the EMA as
    ``optim → ema → shadow`` (a list in the same order), so no model is needed to name the EMA tensors.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)  # the trainer's own file (numpy RNG state)
    try:
        theta: dict[str, Tensor] = payload["weights"]["train"]
        shadow: list[Tensor] = payload["optim"]["ema"]["shadow"]
    except (KeyError, TypeError):
        raise ValueError(
            f"{path} is not a harness.trainer checkpoint: it has no weights → train and optim → ema → shadow entries"
        ) from None
    if not theta or not all(".lora_A." in k or ".lora_B." in k for k in theta):
        raise ValueError(
            f"{path} holds no LoRA weights (a fully fine-tuned model's checkpoint?): keys {list(theta)[:3]}"
        )
    if len(shadow) != len(theta) or any(e.shape != t.shape for e, t in zip(shadow, theta.values(), strict=False)):
        raise ValueError(
            f"{path}: the EMA weights ({len(shadow)} tensors) do not align with θ's {len(theta)} LoRA tensors"
        )

    def cpu(values: Sequence[Tensor]) -> dict[str, Tensor]:
        return {key: value.detach().to("cpu", torch.float32) for key, value in zip(theta, values, strict=True)}

    return cpu(list(theta.values())), cpu(shadow)


def check_lora_rank(state: dict[str, Tensor], lora: LoRASettings, where: str) -> None:
    """``ValueError`` unless every ``lora_A`` of ``state`` has ``lora.rank`` rows (the file would load wrongly)."""
    ranks = {value.shape[0] for key, value in state.items() if ".lora_A." in key}
    if ranks != {lora.rank}:
        raise ValueError(f"{where} holds LoRA of rank {sorted(ranks)}, but its configuration says rank {lora.rank}")


def export_checkpoint_lora(
    checkpoint: str | Path, directory: str | Path, kind: str, lora: LoRASettings, ema: bool = False
) -> Path:
    """θ's LoRA (or its EMA, ``ema=True``) of a trainer checkpoint as a diffusers LoRA folder of model ``kind``.

    ``lora``: the policy's LoRA settings (rank, α, targets), which go into the file's metadata so that
    ``load_lora_weights`` scales the update by α/r. No model is loaded.
    """
    theta, averaged = checkpoint_lora_states(checkpoint)
    check_lora_rank(theta, lora, str(checkpoint))
    return save_lora_file(directory, pipeline_class(kind), averaged if ema else theta, lora)


def export_run_loras(checkpoint: str | Path, folder: str | Path, kind: str, lora: LoRASettings) -> list[Path]:
    """``folder/lora`` (θ) and ``folder/lora_ema`` (its EMA, the weights evaluation uses) from ``checkpoint``."""
    theta, averaged = checkpoint_lora_states(checkpoint)
    check_lora_rank(theta, lora, str(checkpoint))
    pipeline = pipeline_class(kind)
    folder = Path(folder)
    return [
        save_lora_file(folder / "lora", pipeline, theta, lora),
        save_lora_file(folder / "lora_ema", pipeline, averaged, lora),
    ]
