"""Partition a model's trainable parameters into groups that follow its module structure.

A group is the unit every transfer and every optimizer pass works on: normally one transformer block. The
repeated blocks are found structurally (the children of the outermost ``nn.ModuleList`` / ``nn.Sequential``
that holds parameters in more than one child); every other parameter joins a group of the module that owns it
directly (an embedding, a final norm, a head). Groups are listed in module registration order, which for the
models we target is the order the forward pass runs them; the scheduler may reorder them from a trace.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParamGroupSpec:
    """The parameters of one group (trainable, or frozen: see ModelPartition), by their first qualified name, in
    registration order."""

    name: str                             # module path of the group, e.g. "model.layers.3" ("" for the root)
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]


@dataclass(frozen=True)
class ModelPartition:
    groups: tuple[ParamGroupSpec, ...]            # the trainable parameters
    frozen: tuple[tuple[str, nn.Parameter], ...]  # requires_grad=False: no optimizer state, no gradient traffic
    # The frozen floating-point parameters again, grouped by block like the trainable ones (a block's frozen
    # group has the same name as its trainable group, if it has one): what offloaded frozen weights are
    # fetched by. Frozen parameters of other dtypes (integer codes) are not in any group.
    frozen_groups: tuple[ParamGroupSpec, ...]
    aliases: dict[str, str]                       # every other name of a shared (tied) parameter -> its first name


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_block_container(module: nn.Module) -> bool:
    """A ModuleList/Sequential with parameters in two or more children."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    return sum(1 for child in module.children() if next(child.parameters(), None) is not None) >= 2


def _wraps_finer_blocks(container: nn.Module) -> bool:
    """True if one child holds most of the container's parameters and has block containers inside, as in
    ``nn.Sequential(backbone, head)``: the blocks are inside that child, not the container's children."""
    total = _numel(container)
    for child in container.children():
        if 2 * _numel(child) > total and any(_is_block_container(m) for m in child.modules()):
            return True
    return False


def _repeated_block_containers(model: nn.Module) -> list[str]:
    """Module paths of the outermost block containers (see _is_block_container), looking through wrappers."""
    found: list[str] = []
    for path, module in model.named_modules():
        if not _is_block_container(module) or _wraps_finer_blocks(module):
            continue
        if any(path.startswith(outer + ".") for outer in found if outer):
            continue
        if path == "":
            return [""]
        found.append(path)
    return found


def _group_of(param_name: str, containers: list[str]) -> str:
    module_path = param_name.rpartition(".")[0]
    for container in containers:
        prefix = container + "." if container else ""
        if param_name.startswith(prefix):
            block = param_name[len(prefix):].split(".", 1)[0]
            return prefix + block
    return module_path


def partition_model(model: nn.Module) -> ModelPartition:
    """Groups of the trainable parameters of ``model`` (each parameter in exactly one group, tied ones too), and
    of its frozen floating-point ones."""
    containers = _repeated_block_containers(model)
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    members: dict[str, list[tuple[str, nn.Parameter]]] = {}
    frozen: list[tuple[str, nn.Parameter]] = []
    frozen_members: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
            continue
        first_name[id(param)] = name
        if not param.requires_grad:
            frozen.append((name, param))
            if param.is_floating_point():
                frozen_members.setdefault(_group_of(name, containers), []).append((name, param))
            continue
        if not param.is_floating_point():
            raise TypeError(f"offload: trainable parameter {name!r} has dtype {param.dtype}; only floating-point "
                            "parameters can be trained")
        members.setdefault(_group_of(name, containers), []).append((name, param))
    return ModelPartition(groups=_specs(members), frozen=tuple(frozen), aliases=aliases,
                          frozen_groups=_specs(frozen_members))


def _specs(members: dict[str, list[tuple[str, nn.Parameter]]]) -> tuple[ParamGroupSpec, ...]:
    return tuple(ParamGroupSpec(name=group, param_names=tuple(n for n, _ in entries),
                                params=tuple(p for _, p in entries))
                 for group, entries in members.items())

