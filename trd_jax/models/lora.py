"""Low-rank adapters (LoRA, Hu et al. 2021) on the projections of transformer.py, as PEFT computes them:

    y = x W + scale * dropout(x) A B,    scale = alpha / rank  (alpha / sqrt(rank) with use_rslora)

A adapter is an `nnx.Module` attached to the Attention / MLP module that owns the projection, under the name
"<target>_lora" (q_lora, ..., down_lora). A keeps the projection's input axes and B its output axes, with a
`lora_rank` axis between them, so that A and B carry the base matrix's logical axis names and shard like it:

    q:    W [embed, heads, head_dim]     A [embed, lora_rank]             B [lora_rank, heads, head_dim]
    o:    W [heads, head_dim, embed]     A [heads, head_dim, lora_rank]   B [lora_rank, embed]
    down: W [mlp, embed]                 A [mlp, lora_rank]               B [lora_rank, embed]

Adapter matrices are `LoRAParam`s (an nnx.Param subclass), so ``nnx.split(model, LoRAParam, nnx.Param)``
separates the trainable adapters from the frozen base. A model without adapters is the plain model: the same
base state merges into either graph, which is how OPSD's initial teacher reuses the student's base buffers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# target -> (owning module's weight attribute, number of leading input dimensions of that weight)
_WEIGHTS = {"q": ("q_proj", 1), "k": ("k_proj", 1), "v": ("v_proj", 1), "o": ("o_proj", 2),
            "gate": ("gate_proj", 1), "up": ("up_proj", 1), "down": ("down_proj", 1)}
# Hugging Face module names (PEFT's target_modules) of each target.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapters of rank `rank` on `targets` (a subset of TARGETS, in TARGETS order). Defaults: [code-trd]'s
    r 64, alpha 128 on all seven projections (TRD_SPEC §5)."""

    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0  # on the adapters' input, in the update only
    use_rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank}: must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRAConfig.targets={self.targets}: expected distinct names from {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRAParam(nnx.Param):
    """An adapter matrix: the only trainable parameters of a LoRA run."""


class DropoutKey(nnx.Variable):
    """The PRNG key of an adapter's dropout, set on a model inside the update step only (set_dropout_keys)."""


class LoRA(nnx.Module):
    """The adapter of one projection whose weight has shape in_shape + out_shape (`in_dims` input dimensions)."""

    def __init__(self, weight: nnx.Param, in_dims: int, cfg: LoRAConfig, rngs: nnx.Rngs):
        shape = tuple(weight.get_value().shape)
        axes = weight.get_metadata().get("out_sharding") or (None,) * len(shape)
        in_shape, out_shape = shape[:in_dims], shape[in_dims:]
        # PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0, so
        # that the adapted model starts as the base model.
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), in_shape + (cfg.rank,), jnp.float32, -bound, bound)
        self.a = LoRAParam(a, out_sharding=tuple(axes[:in_dims]) + ("lora_rank",), eager_sharding=False)
        self.b = LoRAParam(jnp.zeros((cfg.rank,) + out_shape, jnp.float32),
                           out_sharding=("lora_rank",) + tuple(axes[in_dims:]), eager_sharding=False)
        self.cfg = cfg
        self.in_dims = in_dims

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in_shape] (compute dtype) -> scale * dropout(x) A B: [..., *out_shape]."""
        dt = x.dtype
        key = getattr(self, "dropout_key", None)
        if key is not None and self.cfg.dropout > 0.0:
            keep = jax.random.bernoulli(key[...], 1.0 - self.cfg.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.cfg.dropout), 0.0).astype(dt)
        h = jnp.tensordot(x, self.a[...].astype(dt), axes=self.in_dims)
        # The scale goes into B in float32 before the cast: a bf16 scale (alpha 5 / rank 3) would be rounded,
        # and the trained model would then differ from the merged export and from PEFT.
        return jnp.tensordot(h, (self.b[...].astype(jnp.float32) * self.cfg.scale).astype(dt), axes=1)

    def delta_weight(self) -> jax.Array:
        """f32[*in_shape, *out_shape]: scale * A B, what merging adds to the base weight."""
        return self.cfg.scale * jnp.tensordot(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32),
                                              axes=1)


def adapted(module: nnx.Module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y (the base projection of x) plus the module's adapter for `target` when it has one."""
    adapter = getattr(module, f"{target}_lora", None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


def _owners(model: nnx.Module, target: str):
    """Every module that owns the weight of `target` (one per layer), in graph order."""
    weight = _WEIGHTS[target][0]
    return [node for _, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and isinstance(getattr(node, weight, None), nnx.Param)
            and not isinstance(getattr(node, weight), LoRAParam)]


def add_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Attaches adapters for cfg.targets to `model` in place (the base parameters are untouched) and returns it."""
    if lora_config(model) is not None:
        raise ValueError("add_lora: the model already has adapters")
    owners = {target: _owners(model, target) for target in cfg.targets}  # all checked before any is attached
    for target, found in owners.items():
        if not found:
            raise ValueError(f"add_lora: the model has no {_WEIGHTS[target][0]} for target {target!r}")
    for target, found in owners.items():
        weight, in_dims = _WEIGHTS[target]
        for owner in found:
            setattr(owner, f"{target}_lora", LoRA(getattr(owner, weight), in_dims, cfg, rngs))
    return model


def adapters(model: nnx.Module) -> list[tuple[str, nnx.Module, LoRA]]:
    """(target, owning module, adapter) for every adapter, in graph order."""
    out = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            for target in TARGETS:
                adapter = getattr(node, f"{target}_lora", None)
                if isinstance(adapter, LoRA):
                    out.append((target, node, adapter))
    return out


def remove_lora(model: nnx.Module) -> nnx.Module:
    """Detaches every adapter from `model` in place (the base weights are untouched) and returns it."""
    for target, owner, _ in adapters(model):
        delattr(owner, f"{target}_lora")
    return model


def lora_config(model: nnx.Module) -> LoRAConfig | None:
    found = adapters(model)
    return found[0][2].cfg if found else None


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A plain model (no adapters) whose adapted weights are W + scale * A B, computed in float32 and stored in
    the base weight's dtype. `model` itself is left as it was (its arrays are shared, not modified)."""
    graphdef, state = nnx.split(model)
    # nnx.merge would reuse the state's Variable objects: tree.map makes new ones over the same arrays.
    merged = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for target, owner, adapter in adapters(merged):
        weight = getattr(owner, _WEIGHTS[target][0])
        base = weight.get_value()
        weight.set_value((base.astype(jnp.float32) + adapter.delta_weight()).astype(base.dtype))
        delattr(owner, f"{target}_lora")
    return merged


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Gives every adapter of `model` its own dropout key, fold_in(key, i) (i: the adapter's graph position).
    Meant for the temporary model an update step merges: sampling and scoring models never hold keys."""
    for i, (_, _, adapter) in enumerate(adapters(model)):
        adapter.dropout_key = DropoutKey(jax.random.fold_in(key, i))


def split_lora(model: nnx.Module):
    """(graphdef, adapters: nnx.State of LoRAParam, base: nnx.State of the other Params)."""
    return nnx.split(model, LoRAParam, nnx.Param)


def num_params(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
