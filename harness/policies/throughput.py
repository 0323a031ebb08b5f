"""Throughput options of the diffusers policies (``sd3.py``, ``flux.py``): how the transformer's forward runs.

None of them changes what is computed, only how fast and in how much memory (``docs/sd3.md``, "Throughput
options"); bf16 throughout changes the rounding.

* ``compile_blocks``: regional compilation. Each transformer block is compiled with ``torch.compile``
  (``nn.Module.compile``, in place, so parameter names and LoRA files do not change); blocks of one class share
  their graphs, so compile time stays that of a few blocks. If compilation fails (no C compiler, an operator
  inductor cannot lower), a warning says why and the policy runs eagerly from then on. Compilation is lazy, so
  failures surface at the first call of each new input shape and weight set: that call is run under a guard,
  and where it records a graph for training, its backward is compiled at once too (one extra forward and
  backward, not counted by the compute meter) so a failing backward also falls back here rather than in the
  method's ``.backward()``.
* ``attention_backend``: diffusers' ``set_attention_backend`` where the transformer's attention processors
  dispatch through ``diffusers.models.attention_dispatch`` (FLUX). SD3's ``JointAttnProcessor2_0`` calls
  ``torch.nn.functional.scaled_dot_product_attention`` itself in the installed diffusers (0.42), so for SD3
  only diffusers' torch-native names apply, and they select torch's kernel with ``sdpa_kernel``.
* ``autocast``: True runs the forward under ``torch.autocast(dtype)``, as before. False runs the transformer in
  ``dtype`` throughout (bf16 activations; autocast would keep norms and softmax outputs in fp32): the fp32
  LoRA master weights are cast to the input's dtype inside each LoRA matmul, so their gradients still arrive
  in fp32. With ``dtype: fp32`` the two are the same.
* Gradient checkpointing stays the policies' own ``gradient_checkpointing`` (diffusers' method).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.validation import require

COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile_blocks; the CPU tests use "eager" (dynamo only)
# Compiled graphs per code object: blocks of a class × weight sets (θ, old, ref) × grad mode × static/dynamic
# batch; torch's default of 8 would silently leave the rest eager.
RECOMPILE_LIMIT = 64
# diffusers' names of torch's own SDPA kernels, and the SDPBackend each selects (None: torch's choice).
TORCH_SDPA_BACKENDS: dict[str, str | None] = {
    "native": None, "_native_flash": "FLASH_ATTENTION", "_native_efficient": "EFFICIENT_ATTENTION",
    "_native_cudnn": "CUDNN_ATTENTION", "_native_math": "MATH",
}  # fmt: skip
# The attention processor class each policy's transformer uses ("module:attr"): validation reads it, no model.
SD3_ATTENTION_PROCESSOR = "diffusers.models.attention_processor:JointAttnProcessor2_0"
FLUX_ATTENTION_PROCESSOR = "diffusers.models.transformers.transformer_flux:FluxAttnProcessor"


class ThroughputSettings(Protocol):
    """The throughput fields of a policy config (``SD3PolicyConfig``, ``FluxPolicyConfig``)."""

    @property
    def compile_blocks(self) -> bool: ...
    @property
    def attention_backend(self) -> str | None: ...
    @property
    def autocast(self) -> bool: ...


def attention_backends() -> tuple[str, ...]:
    """Every backend name diffusers' ``set_attention_backend`` accepts (``AttentionBackendName``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(sorted(member.value for member in AttentionBackendName))


def check_attention_backend(name: str | None, processor: str) -> None:
    """Validation, before any model loads: ``name`` is None or a diffusers backend that ``processor`` can use.

    ``processor`` ("module:attr") is the policy's attention processor class. One that does not dispatch
    through diffusers' registry can only take torch's own kernels (:data:`TORCH_SDPA_BACKENDS`). For one that
    does, diffusers' check that the backend's package is installed (flash-attn, sageattention, ...) runs too.
    """
    if name is None:
        return
    names = attention_backends()
    require(name in names, "attention_backend", name, f"null (the default) or one of diffusers' {', '.join(names)}")
    module, _, attr = processor.partition(":")
    processor_cls = getattr(importlib.import_module(module), attr)
    if not hasattr(processor_cls, "_attention_backend"):
        import diffusers

        require(name in TORCH_SDPA_BACKENDS, "attention_backend", name,
                f"one of {', '.join(TORCH_SDPA_BACKENDS)}: diffusers {diffusers.__version__}'s {attr} calls torch's "
                "scaled_dot_product_attention itself, so only torch's own kernels can be chosen")  # fmt: skip
        return
    from diffusers.models import attention_dispatch

    requirements = getattr(attention_dispatch, "_check_attention_backend_requirements", None)  # private: may go
    if requirements is not None:
        try:
            requirements(attention_dispatch.AttentionBackendName(name))
        except RuntimeError as error:
            raise ValueError(
                f"attention_backend must be a backend this machine can run, got {name!r}: {error}"
            ) from None


def compile_blocks(blocks: Sequence[nn.Module]) -> None:
    """``torch.compile`` each block in place (:data:`COMPILE_BACKEND`), with room for :data:`RECOMPILE_LIMIT` graphs."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=COMPILE_BACKEND)


def uncompile_blocks(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`compile_blocks`: ``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl``."""
    for block in blocks:
        block._compiled_call_impl = None


def _linear_in_input_dtype(linear: nn.Linear, x: Tensor) -> Tensor:
    """``linear(x)`` with the (fp32 master) weight cast to x's dtype; the gradient flows back to it in fp32."""
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return F.linear(x, linear.weight.to(x.dtype), bias)


def lora_in_input_dtype(transformer: nn.Module, on: bool = True) -> int:
    """Make peft's LoRA layers compute in their input's dtype (``on=False`` undoes it); returns the layer count.

    peft casts a LoRA layer's input to the LoRA weights' dtype (fp32 here) and the sum back to the base
    output's: without autocast the LoRA matmuls would run in fp32. Here the input keeps its dtype
    (``cast_input_dtype_enabled``, peft's own switch) and each ``lora_A``/``lora_B`` casts its weight instead.
    """
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = not on
            linears: list[Any] = [*module.lora_A.values(), *module.lora_B.values()]
            for linear in linears:
                if on:
                    linear.forward = functools.partial(_linear_in_input_dtype, linear)
                else:
                    linear.__dict__.pop("forward", None)  # back to nn.Linear.forward
            changed += 1
    return changed


def _dynamo_skips() -> bool:
    """Dynamo runs eagerly under a torch dispatch mode such as the meter's ``FlopCounterMode`` (the test
    torch's own ``convert_frame`` applies), so a call there proves nothing about compilation."""
    from torch.utils._python_dispatch import any_torch_dispatch_mode_on_stack  # private: the predicate dynamo uses

    return any_torch_dispatch_mode_on_stack()


class ThroughputOptions:
    """Runs a policy's transformer forward under its throughput options (module docstring).

    ``blocks``: the transformer's repeated blocks (compiled when ``settings.compile_blocks``); ``params``: θ's
    LoRA parameters (the backward of a compiled graph is compiled against them); ``owner`` names the policy in
    messages.
    """

    def __init__(
        self, transformer: nn.Module, blocks: Sequence[nn.Module], params: Sequence[Tensor],
        settings: ThroughputSettings, dtype: torch.dtype, device: torch.device, *, owner: str,
    ) -> None:  # fmt: skip
        self.dtype, self.device, self.owner, self.params = dtype, device, owner, params
        self.autocast = settings.autocast
        self.sdpa_backend: Any = None  # a torch SDPBackend to select around the forward, or None
        if settings.attention_backend is not None:
            self._set_attention(transformer, settings.attention_backend)
        if not settings.autocast and dtype != torch.float32:
            lora_in_input_dtype(transformer)
        self.blocks = list(blocks)
        self.compiled: list[nn.Module] = []  # the blocks while compiled; [] when eager (or after a fallback)
        self._guarded: set[Hashable] = set()  # (shape, weight set, grad) calls that ran compiled without error
        self.set_compiled(settings.compile_blocks)

    def set_compiled(self, on: bool) -> None:
        """Compile the blocks, or go back to eager (the GPU bench times both on one model)."""
        if on and not self.compiled:
            compile_blocks(self.blocks)
            self.compiled, self._guarded = list(self.blocks), set()
        elif not on and self.compiled:
            uncompile_blocks(self.compiled)
            self.compiled = []

    def _set_attention(self, transformer: nn.Module, name: str) -> None:
        processors: Any = getattr(transformer, "attn_processors", {})  # diffusers' AttentionMixin property
        if processors and all(hasattr(p, "_attention_backend") for p in processors.values()):
            from diffusers import attention_backend

            try:  # set_attention_backend also makes ``name`` the process-wide default; the context restores that
                with attention_backend():
                    transformer.set_attention_backend(name)  # type: ignore[operator]  # diffusers ModelMixin method
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"{self.owner}: attention_backend {name!r} cannot be set: {error}") from None
            return
        if name not in TORCH_SDPA_BACKENDS:
            raise ValueError(
                f"{self.owner}: attention_backend {name!r}: {type(transformer).__name__}'s attention processors call "
                f"torch's scaled_dot_product_attention directly; allowed: {', '.join(TORCH_SDPA_BACKENDS)}"
            )
        kernel = TORCH_SDPA_BACKENDS[name]
        if kernel is not None:
            from torch.nn.attention import SDPBackend

            self.sdpa_backend = getattr(SDPBackend, kernel)

    @contextmanager
    def context(self) -> Iterator[None]:
        """Autocast (``settings.autocast`` and a non-fp32 dtype) and the SDPA kernel, around one forward."""
        with ExitStack() as stack:
            if self.autocast and self.dtype != torch.float32:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            if self.sdpa_backend is not None:
                from torch.nn.attention import sdpa_kernel

                stack.enter_context(sdpa_kernel(self.sdpa_backend))
            yield

    def run(self, forward: Callable[[], Tensor], key: Hashable) -> Tensor:
        """``forward()`` under :meth:`context`; the first compiled call per ``key`` (shape, weight set) is guarded."""
        key = (key, torch.is_grad_enabled())
        if not self.compiled or key in self._guarded or _dynamo_skips():
            with self.context():
                return forward()
        try:
            with self.context():
                out = forward()
                if out.requires_grad:  # compile the backward now, where a failure can still fall back
                    trainable = [p for p in self.params if p.requires_grad]
                    # retain_graph: the inputs may carry a graph of earlier calls (reward backprop) that the
                    # method's own backward still needs.
                    torch.autograd.grad(out.float().sum(), trainable, allow_unused=True, retain_graph=True)
                    out = forward()
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # any compile failure: dynamo, inductor, a missing compiler
            self.fall_back(error)
            with self.context():
                return forward()
        self._guarded.add(key)
        return out

    def fall_back(self, error: BaseException) -> None:
        """Warn (with the root cause: dynamo wraps a backend's error in ``BackendCompilerFailed``) and run eagerly."""
        cause = error
        while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
            cause = inner
        lines = str(cause).strip().splitlines()
        warnings.warn(
            f"{self.owner}: torch.compile of the transformer blocks failed ({type(cause).__name__}: "
            f"{lines[0] if lines else ''}); "
            "running eagerly (compile_blocks: false avoids the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        self.set_compiled(False)
