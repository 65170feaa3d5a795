"""DTensor inputs of the vocab-parallel functions: the group and the offsets from the mesh.

Tensor parallelism in PyTorch is DTensor: ``parallelize_module(model, mesh,
{"lm_head": ColwiseParallel()})`` turns ``lm_head.weight`` (and its bias) into a
DTensor sharded on dim 0 (``Shard(0)``) over one mesh dimension, the logits it
makes are sharded on the last dim, and ``loss_parallel()`` computes the
cross-entropy of such logits. Here such a DTensor is turned into what the
vocab-parallel functions take: its local shard, the process group of the mesh
dimension that shards it, and the shard's first row and the full size.

``Shard(d)`` lays a dimension of size ``V`` out as ``torch.chunk`` does: ``P`` pieces
of ``ceil(V / P)`` rows, in mesh order, the last ones shorter or empty. The offset
is computed from that rule and checked against the local shard's size (a layout
that does not follow it is refused, never guessed). ``to_local()`` is
differentiable: the gradient of the local shard comes back to the DTensor
parameter as a DTensor with the same placements.

Only the public ``torch.distributed.tensor`` API is used (torch >= 2.5); without it
no input is a DTensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LocalCall", "MeshShard", "is_dtensor", "local_bias", "localize", "mesh_shard", "replicated_local"]


def _dtensor_api() -> Any | None:
    """``torch.distributed.tensor``, or None where this build of torch lacks it."""
    if not dist.is_available():
        return None
    try:
        import torch.distributed.tensor as api
    except ImportError:  # torch < 2.5, or a build without distributed tensors
        return None
    return api if hasattr(api, "DTensor") else None


def is_dtensor(value: object) -> bool:
    api = _dtensor_api()
    return api is not None and isinstance(value, api.DTensor)


@dataclass(frozen=True)
class MeshShard:
    """A DTensor's local piece along its sharded dimension and where it lies.

    ``local``: the local tensor (``to_local()``, differentiable); ``group``: the process
    group of the mesh dimension ``mesh_dim`` that shards it; ``start``/``total``: the
    piece's first index and the full size of the sharded dimension.
    """

    local: torch.Tensor
    group: dist.ProcessGroup
    start: int
    total: int
    mesh: Any
    mesh_dim: int


def mesh_shard(tensor: Any, dim: int, name: str, made_by: str) -> MeshShard:
    """The piece of a DTensor sharded on tensor dim ``dim`` over exactly one mesh dimension.

    Raises:
        ValueError: when ``tensor`` is sharded otherwise (another tensor dim, several
            mesh dims, a strided or partial placement) or replicated; ``made_by`` says
            what makes the expected layout.
    """
    api = _dtensor_api()
    if api is None:
        raise ValueError(f"{name} looks sharded, but this build of torch has no torch.distributed.tensor")
    placements = tuple(tensor.placements)
    dim = dim % tensor.ndim
    sharding = [i for i, p in enumerate(placements) if type(p) is api.Shard and p.dim % tensor.ndim == dim]
    others = [p for i, p in enumerate(placements) if i not in sharding and type(p) is not api.Replicate]
    if len(sharding) != 1 or others:
        raise ValueError(
            f"{name} is a DTensor with placements {placements} on a mesh of shape {tuple(tensor.device_mesh.shape)}; "
            f"expected Shard({dim}) on exactly one mesh dimension and Replicate() on the others ({made_by})"
        )
    mesh, mesh_dim = tensor.device_mesh, sharding[0]
    total, pieces = tensor.shape[dim], mesh.size(mesh_dim)
    coordinate = mesh.get_local_rank(mesh_dim)
    step = -(-total // pieces)  # torch.chunk: ceil(total / pieces) per piece, in mesh order
    start = min(coordinate * step, total)
    size = min(total, start + step) - start
    local = tensor.to_local()
    if local.shape[dim] != size:
        raise ValueError(
            f"{name}: the local shard has {local.shape[dim]} rows along dim {dim}, but Shard({dim}) of {total} over "
            f"{pieces} pieces gives piece {coordinate} {size} rows (torch.chunk's layout); lmloss cannot locate it"
        )
    return MeshShard(local, mesh.get_group(mesh_dim), start, total, mesh, mesh_dim)


def replicated_local(value: Any, shard: MeshShard, name: str) -> Any:
    """``value`` as a local tensor replicated over the shard's mesh dimension.

    A plain tensor is returned as is (it must already be the same on every rank of
    the group). A DTensor on the same mesh is redistributed to ``Replicate()`` on
    that dimension (e.g. sequence-parallel hidden states, ``Shard(1)``: one
    all-gather, differentiable), other mesh dimensions keep their placement, and its
    local tensor is returned.
    """
    api = _dtensor_api()
    if api is None or not isinstance(value, api.DTensor):
        return value
    if value.device_mesh != shard.mesh:
        raise ValueError(
            f"{name} is a DTensor on another device mesh ({value.device_mesh}) than the sharded one ({shard.mesh})"
        )
    placements = list(value.placements)
    if type(placements[shard.mesh_dim]) is not api.Replicate:
        placements[shard.mesh_dim] = api.Replicate()
        value = value.redistribute(shard.mesh, placements)
    return value.to_local()


@dataclass(frozen=True)
class LocalCall:
    """A vocab-parallel call's inputs as local tensors: the shard, its group and layout,
    and the inputs that every rank of the group holds alike (in the order given)."""

    shard: Any
    group: dist.ProcessGroup | None
    vocab_start: int | None
    vocab_size: int | None
    replicated: tuple[Any, ...]
    piece: MeshShard | None = None


def localize(
    sharded: Any,
    dim: int,
    name: str,
    group: dist.ProcessGroup | None,
    vocab_start: int | None,
    vocab_size: int | None,
    replicated: dict[str, Any],
) -> LocalCall:
    """The local form of a call whose ``sharded`` input may be a DTensor (sharded on ``dim``).

    A plain ``sharded`` passes through (then no other input may be a DTensor). A
    DTensor gives the group and the layout; ``group``, ``vocab_start`` and ``vocab_size``
    may then be left None, and must agree with the mesh where given.
    """
    if not is_dtensor(sharded):
        for other, value in replicated.items():
            if is_dtensor(value):
                raise ValueError(
                    f"{other} is a DTensor but {name} is not: pass {name} as the DTensor sharded over the "
                    f"vocabulary (it gives the group and the layout), or every input as a plain tensor"
                )
        return LocalCall(sharded, group, vocab_start, vocab_size, tuple(replicated.values()))
    made_by = "what ColwiseParallel makes of lm_head" if dim == 0 else "the output of a ColwiseParallel lm_head"
    piece = mesh_shard(sharded, dim, name, made_by)
    if group is not None and _ranks(group) != _ranks(piece.group):
        raise ValueError(
            f"group has ranks {_ranks(group)} but {name} is sharded over the mesh dimension {piece.mesh_dim} with "
            f"ranks {_ranks(piece.group)}; pass group=None to use the mesh's"
        )
    for given, derived, what in ((vocab_start, piece.start, "vocab_start"), (vocab_size, piece.total, "vocab_size")):
        if given is not None and given != derived:
            raise ValueError(f"{what}={given} but the DTensor {name} gives {derived}; leave it None")
    values = tuple(replicated_local(value, piece, other) for other, value in replicated.items())
    return LocalCall(piece.local, piece.group, piece.start, piece.total, values, piece)


def local_bias(bias: Any, piece: MeshShard | None) -> Any:
    """The local shard of a ``[V]`` bias DTensor laid out like the weight (``Shard(0)`` on the same mesh dim)."""
    if bias is None or (piece is None and not is_dtensor(bias)):
        return bias
    if piece is None:
        raise ValueError("bias is a DTensor but weight_shard is not: pass both as DTensors or both plain")
    if not is_dtensor(bias):
        raise ValueError("weight_shard is a DTensor but bias is not: pass the lm_head's bias parameter as it is")
    own = mesh_shard(bias, 0, "bias", "what ColwiseParallel makes of lm_head")
    if (own.mesh, own.mesh_dim, own.start, own.total) != (piece.mesh, piece.mesh_dim, piece.start, piece.total):
        raise ValueError(
            f"bias is sharded as rows [{own.start}, {own.start + own.local.shape[0]}) of {own.total} on mesh "
            f"dimension {own.mesh_dim}, unlike weight_shard (rows from {piece.start} of {piece.total}, dimension "
            f"{piece.mesh_dim})"
        )
    return own.local


def _ranks(group: dist.ProcessGroup) -> list[int]:
    return list(dist.get_process_group_ranks(group))
