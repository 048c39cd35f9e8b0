"""A Dense (projection) head after pooling: ``activation(pooled @ kernel + bias)``, sentence-
transformers' ``Dense`` module as pure functions.

The head's params live in the encoder's tree as ``params["dense"]`` (``{"kernel": (D_in, D_out),
"bias": (D_out,)}``, the bias optional), so they train, shard and export with the model; its
activation is static (``Encoder.dense``, passed to ``embed(dense=...)``). It loads from and saves
to sentence-transformers' ``Dense`` module directory (``config.json`` with ``in_features``,
``out_features``, ``bias``, ``activation_function``; ``model.safetensors`` with ``linear.weight``
(out, in) and ``linear.bias``). PCA whitening (``embedjax.whitening``) is such a head with the
identity activation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.encoders.statedict import CheckpointError

KEY = "dense"
# activation name -> (function, sentence-transformers' activation_function class path)
ACTIVATIONS = {
    "identity": (lambda x: x, "torch.nn.modules.linear.Identity"),
    "tanh": (jnp.tanh, "torch.nn.modules.activation.Tanh"),
    "relu": (jax.nn.relu, "torch.nn.modules.activation.ReLU"),
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), "torch.nn.modules.activation.GELU"),
    "sigmoid": (jax.nn.sigmoid, "torch.nn.modules.activation.Sigmoid"),
}
_BY_CLASS = {path: name for name, (_, path) in ACTIVATIONS.items()}


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown Dense activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
    return activation


def init(in_features: int, out_features: int, key, *, bias: bool = True) -> dict:
    """Fresh params as ``torch.nn.Linear`` initialises them (uniform in +-1/sqrt(in_features))."""
    bound = 1.0 / math.sqrt(in_features)
    k_w, k_b = jax.random.split(key)
    params = {"kernel": jax.random.uniform(k_w, (in_features, out_features), jnp.float32, -bound, bound)}
    if bias:
        params["bias"] = jax.random.uniform(k_b, (out_features,), jnp.float32, -bound, bound)
    return params


def apply(params: dict, pooled, activation: str):
    """``activation(pooled @ kernel + bias)`` on (..., D_in) -> (..., D_out), float32."""
    z = pooled.astype(jnp.float32) @ params["kernel"].astype(jnp.float32)
    if "bias" in params:
        z = z + params["bias"].astype(jnp.float32)
    return ACTIVATIONS[check_activation(activation)][0](z)


def out_features(params: dict) -> int:
    return int(params["kernel"].shape[1])


def read_sentence_transformers(module_dir: Path) -> tuple[dict, str]:
    """``(params, activation)`` of a sentence-transformers ``Dense`` module directory."""
    config_path = module_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{module_dir}: a Dense module without config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    activation = _BY_CLASS.get(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if activation is None:
        raise CheckpointError(f"{config_path}: activation_function {config.get('activation_function')!r} is not "
                              f"one embedjax computes ({sorted(_BY_CLASS)})")
    if (module_dir / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        state = load_file(str(module_dir / "model.safetensors"))
    elif (module_dir / "pytorch_model.bin").is_file():
        import torch  # older sentence-transformers saved the Dense module with torch.save

        state = {k: v.numpy() for k, v in torch.load(module_dir / "pytorch_model.bin", map_location="cpu",
                                                     weights_only=True).items()}
    else:
        raise CheckpointError(f"{module_dir}: a Dense module without model.safetensors or pytorch_model.bin")
    weight = state.get("linear.weight")
    shape = (config.get("out_features"), config.get("in_features"))
    if weight is None or tuple(weight.shape) != shape:
        raise CheckpointError(f"{module_dir}: linear.weight of shape "
                              f"{None if weight is None else tuple(weight.shape)}, config.json says {shape}")
    params = {"kernel": np.asarray(weight, np.float32).T}
    if config.get("bias", True):
        if "linear.bias" not in state:
            raise CheckpointError(f"{module_dir}: config.json says bias=True but linear.bias is missing")
        params["bias"] = np.asarray(state["linear.bias"], np.float32)
    return params, activation


def write_sentence_transformers(module_dir: Path, params: dict, activation: str) -> None:
    """Writes ``params`` as a sentence-transformers ``Dense`` module directory."""
    from safetensors.numpy import save_file

    module_dir.mkdir(parents=True, exist_ok=True)
    kernel = np.asarray(params["kernel"], np.float32)
    config = {"in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]), "bias": "bias" in params,
              "activation_function": ACTIVATIONS[check_activation(activation)][1]}
    (module_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {"linear.weight": np.ascontiguousarray(kernel.T)}
    if "bias" in params:
        state["linear.bias"] = np.asarray(params["bias"], np.float32)
    save_file(state, str(module_dir / "model.safetensors"), metadata={"format": "pt"})
