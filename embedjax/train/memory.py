"""Will the step fit? The compiled train step's per-device memory, known before step 1.

``jax.jit(...).lower(abstract args).compile().memory_analysis()`` is XLA's own account of
the program each device runs: its arguments (this device's shards of params, optimizer
state and batch), outputs, and temporaries (activations kept for the backward pass, the
similarity matrix, gradients). Nothing is allocated to learn it, so a 7B configuration can
be checked on a laptop's CPU with simulated devices, and the loop checks a run before it
starts: a config that will not fit is refused with what to change, instead of an
out-of-memory error an hour into a TPU job.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled program (XLA's ``memory_analysis``)."""

    arguments: int
    outputs: int
    aliased: int      # outputs written in place of donated arguments (counted once)
    temporaries: int
    code: int

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to them + temporaries + code: the device's high-water mark."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def describe(self) -> str:
        gib = _size
        return (f"{gib(self.peak)} per device (arguments {gib(self.arguments)}, outputs {gib(self.outputs)} of which "
                f"{gib(self.aliased)} donated in place, temporaries {gib(self.temporaries)})")


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.2f} MiB"


def step_memory(compiled) -> StepMemory:
    """``StepMemory`` of a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend reports no memory analysis for compiled programs")
    return StepMemory(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                      aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
                      code=int(getattr(m, "generated_code_size_in_bytes", 0)))


def device_memory_limit(device=None) -> int | None:
    """Bytes a device can hold (``memory_stats()['bytes_limit']`` on GPU/TPU), None where unknown (CPU)."""
    import jax

    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check_fits(memory: StepMemory, limit_bytes: int | None, *, batch_size: int, gradcache_chunk: int,
               mesh_shape: dict, remat, negatives_exchange: str = "") -> None:
    """Raises ``MemoryError`` naming the knobs when ``memory.peak`` exceeds ``limit_bytes`` (None: no check)."""
    if limit_bytes is None or memory.peak <= limit_bytes:
        return
    fsdp = mesh_shape.get("fsdp", 1)
    raise MemoryError(
        f"the train step needs {memory.describe()}, but a device holds {_size(limit_bytes)}. "
        f"Change one of: batch_size (now {batch_size}; activations grow with it), "
        f"objective.gradcache_chunk (now {gradcache_chunk or 'off'}; > 0 embeds that many rows at a time, so "
        f"activation memory follows the chunk, not the batch), mesh.fsdp (now {fsdp}; splits params, "
        f"gradients and optimizer state over more devices), mesh.model (now {mesh_shape.get('model', 1)}; "
        f"tensor parallelism), objective.remat (now {remat!r}; recompute layers in the backward pass), "
        "or lora.rank > 0 (train adapters only: no optimizer state for the base)"
        + (f", objective.negatives_exchange (now {negatives_exchange!r}; 'ring' holds (local x local) contrastive "
           "logit blocks instead of (local x global))" if negatives_exchange else "") + ". "
        "Set memory_limit_gib to override the device's limit.")
