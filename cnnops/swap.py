"""cnnops.swap / cnnops.unswap: put cnnops modules into an existing model, and take them out.

A swapped module is a new object of the cnnops class carrying the old module's state: its
__dict__ is copied, so the Parameter and buffer objects, hooks, training flag and any attribute a
user set on it move over without running __init__ (which would allocate and initialise weights
only to throw them away). The hook dictionaries are shared rather than copied, so the
RemovableHandles returned when the hooks were registered still remove them from the new module.
"""

import dataclasses
import fnmatch
import inspect

import torch

from cnnops.nn.conv import Conv2d, ConvTranspose2d
from cnnops.nn.roi import LevelMapper, MultiScaleRoIAlign, RoIAlign, RoIPool
from cnnops.ops._backend import resolve_backend
from cnnops.ops.conv2d import ALGOS, BACKEND_ALGOS

# Kernels exist for these dtypes on each backend (csrc/ops/cpu: AT_DISPATCH_FLOATING_TYPES;
# csrc/ops/cuda: ..._AND2(Half, BFloat16); kernels/: float32 accumulation, float64 with FP64).
_BACKEND_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# Per-module containers that __dict__ holds and that the new module gets its own copy of. The
# other containers (the hook dictionaries) are shared; see the module docstring.
_OWN_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


@dataclasses.dataclass
class SwapReport:
    """What cnnops.swap did: `swapped` holds (name, old type, new type) rows, `left_alone`
    (name, type, reason) rows; names are as in model.named_modules() ("" is the model itself).
    len(report) is the number of modules swapped."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left_alone: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.swapped)

    def __str__(self):
        lines = [f"cnnops.swap: {len(self.swapped)} swapped, {len(self.left_alone)} left alone"]
        if self.swapped:
            lines += ["", "swapped:"]
            lines += _table(("module", "from", "to"), self.swapped)
        if self.left_alone:
            lines += ["", "left alone:"]
            lines += _table(("module", "type", "reason"), self.left_alone)
        return "\n".join(lines)


def _table(header, rows):
    rows = [tuple(r) for r in rows]
    rows = [(name or "(model)", *rest) for name, *rest in rows]
    # The last column is left unpadded: a long reason should not widen the others.
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]

    def fmt(row):
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)]
        return ("  " + "  ".join([*cells, str(row[-1])])).rstrip()

    return [fmt(header), fmt(tuple("-" * len(h) for h in header)), *(fmt(r) for r in rows)]


def _torchvision_ops():
    """torchvision.ops, or None: torchvision is only needed when a model contains its modules,
    and importing it costs time that `import cnnops` should not pay."""
    try:
        import torchvision.ops
    except ImportError:
        return None
    return torchvision.ops


def _type_name(cls):
    tv = _torchvision_ops()
    known = {
        torch.nn.Conv2d: "torch.nn.Conv2d",
        torch.nn.ConvTranspose2d: "torch.nn.ConvTranspose2d",
        Conv2d: "cnnops.nn.Conv2d",
        ConvTranspose2d: "cnnops.nn.ConvTranspose2d",
        RoIAlign: "cnnops.nn.RoIAlign",
        RoIPool: "cnnops.nn.RoIPool",
        MultiScaleRoIAlign: "cnnops.nn.MultiScaleRoIAlign",
    }
    if tv is not None:
        known.update(
            {
                tv.RoIAlign: "torchvision.ops.RoIAlign",
                tv.RoIPool: "torchvision.ops.RoIPool",
                tv.MultiScaleRoIAlign: "torchvision.ops.MultiScaleRoIAlign",
            }
        )
    return known.get(cls, f"{cls.__module__}.{cls.__qualname__}")


def _patterns(patterns, arg):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"cnnops.swap: {arg} must be a list of strings, got {patterns!r}")
    return patterns


def _pattern_reason(names, include, exclude):
    """Why include/exclude keep this module out, or None. A module reachable under several
    names (a shared module) is matched by any of them; exclude wins."""
    for pattern in exclude or ():
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return f"excluded by pattern {pattern!r}"
    if include is not None and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
        return "not matched by include"
    return None


def _overrides(cls, base, methods):
    return [m for m in methods if getattr(cls, m, None) is not getattr(base, m)]


def _conv_reason(module, algo, backend):
    """Why cnnops.nn.Conv2d cannot take this torch.nn.Conv2d's place, or None."""
    weight = module.weight
    if isinstance(weight, torch.nn.parameter.UninitializedParameter):
        return "uninitialized lazy module (run a forward pass first)"
    if not weight.is_floating_point():
        return f"dtype {weight.dtype}: cnnops conv2d needs floating-point weights"
    if weight.device.type == "meta":
        return None  # the fake kernels serve every backend
    try:
        resolved = resolve_backend("conv2d", weight.device, backend)
    except (RuntimeError, ValueError) as e:
        return str(e)
    if weight.dtype not in _BACKEND_DTYPES[resolved]:
        return f"cnnops has no {weight.dtype} conv2d kernels on the {resolved} backend"
    if algo != "auto" and algo not in BACKEND_ALGOS[resolved]:
        return f"algo {algo!r} is not available on the {resolved} backend"
    if algo == "depthwise" and module.groups != module.in_channels:
        return (
            f"algo='depthwise' needs groups == in_channels, got groups={module.groups}, "
            f"in_channels={module.in_channels}"
        )
    return None


def _roi_classes(tv):
    """(torchvision class, cnnops class) pairs of the RoI modules swap() replaces."""
    return (
        (tv.RoIAlign, RoIAlign),
        (tv.RoIPool, RoIPool),
        (tv.MultiScaleRoIAlign, MultiScaleRoIAlign),
    )


def _conv_transpose_reason(module, algo, backend):
    """Why cnnops.nn.ConvTranspose2d cannot take this torch.nn.ConvTranspose2d's place, or None.
    Its kernels are conv2d's (grad input): the same dtype and backend rules, but depthwise is
    conv2d's depthwise seen from its grad input (groups == out_channels)."""
    reason = _conv_reason(module, "auto" if algo == "depthwise" else algo, backend)
    depthwise = module.groups == module.out_channels and module.in_channels % module.groups == 0
    if reason is None and algo == "depthwise" and not depthwise:
        return (
            f"algo='depthwise' needs groups == out_channels (in_channels a multiple of it), got "
            f"groups={module.groups}, out_channels={module.out_channels}"
        )
    return reason


def _conv_subclass_reason(module, base):
    """Why a subclass of torch's conv module `base` is left alone."""
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
        return "uninitialized lazy module (run a forward pass first)"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "parametrized (torch.nn.utils.parametrize); swapping would drop it"
    methods = [m for m in ("forward", "_conv_forward") if hasattr(base, m)]
    own = _overrides(type(module), base, methods)
    if own:
        return f"subclass of {_type_name(base)} with its own {own[0]}"
    return f"subclass of {_type_name(base)}; swapping would drop its own methods"


def _plan(module, algo, backend):
    """(new class, reason): the cnnops class to swap `module` to, or why it is left alone.
    (None, None) for modules swap() has nothing to say about."""
    cls = type(module)
    tv = _torchvision_ops()
    if isinstance(module, (Conv2d, ConvTranspose2d, RoIAlign, RoIPool, MultiScaleRoIAlign)):
        return None, "already a cnnops module"
    if isinstance(module, torch.nn.ConvTranspose2d):
        if cls is not torch.nn.ConvTranspose2d:
            return None, _conv_subclass_reason(module, torch.nn.ConvTranspose2d)
        return ConvTranspose2d, _conv_transpose_reason(module, algo, backend)
    if isinstance(module, torch.nn.Conv2d):
        if cls is not torch.nn.Conv2d:
            return None, _conv_subclass_reason(module, torch.nn.Conv2d)
        return Conv2d, _conv_reason(module, algo, backend)
    if tv is not None:
        for torch_cls, cnnops_cls in _roi_classes(tv):
            if isinstance(module, torch_cls):
                if cls is not torch_cls:
                    return None, f"subclass of {_type_name(torch_cls)}"
                return cnnops_cls, None
    return None, None


def _rebuild(module, new_cls, drop=()):
    """A new `new_cls` module with `module`'s state (see the module docstring)."""
    new = new_cls.__new__(new_cls)
    state = dict(module.__dict__)
    for key in _OWN_CONTAINERS:
        if key in state:
            state[key] = type(state[key])(state[key])
    for key in drop:
        state.pop(key, None)
    new.__dict__.update(state)
    return new


def _modules_by_identity(model):
    """{id: (module, [every qualified name it has])}, in named_modules() order."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        found.setdefault(id(module), (module, []))[1].append(name)
    return found


def _replace(model, replacements):
    """Puts replacements[id(old)] in every place `old` occupies below `model`."""
    seen = {id(model)}
    stack = [model]
    while stack:
        parent = stack.pop()
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in replacements:
                child = replacements[id(child)][1]
                parent._modules[key] = child
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)


def swap(model, *, algo="auto", backend=None, include=None, exclude=None):
    """Replaces, in place, every torch.nn.Conv2d / ConvTranspose2d in `model` with
    cnnops.nn.Conv2d / ConvTranspose2d and every torchvision.ops.RoIAlign / RoIPool /
    MultiScaleRoIAlign with cnnops.nn.RoIAlign / RoIPool / MultiScaleRoIAlign; returns a
    SwapReport. A MultiScaleRoIAlign keeps the scales it has already inferred.

    The new modules keep the old ones' Parameter and buffer objects (optimizers and tied weights
    keep working), hooks, training mode and attributes; a module shared by several parents
    becomes one new module shared by all of them. Swap after moving the model to its device and
    dtype: a conv is swapped only if cnnops has kernels for its weight's device and dtype on the
    backend its calls would resolve to now.

    algo, backend: given to every swapped cnnops.nn.Conv2d and ConvTranspose2d (see
        cnnops.conv2d); backend also to the swapped RoI modules. A conv the algo cannot serve is
        left alone.
    include, exclude: fnmatch patterns on qualified names (as in model.named_modules()); a module
        is swapped only if include is None or matches it, and exclude does not. Exclude wins.
    Left alone, with the reason in the report: modules cnnops cannot serve, subclasses (their
    own forward or methods would be lost), modules already from cnnops, and the model itself
    (swap replaces submodules in their parents; wrap a bare module first).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"cnnops.swap: model must be a torch.nn.Module, got {type(model).__name__}")
    if algo != "auto" and algo not in ALGOS:
        raise ValueError(f"cnnops.swap: unknown algo {algo!r}; expected 'auto' or one of {ALGOS}")
    if backend is not None and backend not in BACKEND_ALGOS:
        raise ValueError(
            f"cnnops.swap: unknown backend {backend!r}; expected None or one of "
            f"{tuple(BACKEND_ALGOS)}"
        )
    if backend is not None and algo != "auto" and algo not in BACKEND_ALGOS[backend]:
        raise ValueError(
            f"cnnops.swap: algo {algo!r} is not available on the {backend} backend "
            f"(it has: {', '.join(BACKEND_ALGOS[backend])})"
        )
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")

    report = SwapReport()
    replacements = {}
    for module, names in _modules_by_identity(model).values():
        new_cls, reason = _plan(module, algo, backend)
        if new_cls is None and reason is None:
            continue
        if reason is None:
            reason = _pattern_reason(names, include, exclude)
        if reason is None and module is model:
            reason = "the model itself: swap replaces submodules; wrap it in a container"
        if reason is not None:
            report.left_alone.append((names[0], _type_name(type(module)), reason))
            continue
        new = _rebuild(module, new_cls)
        if new_cls in (Conv2d, ConvTranspose2d):
            new.algo = algo
            new.backend = backend
        elif "backend" in inspect.signature(new_cls.__init__).parameters:
            new.backend = backend
        replacements[id(module)] = (module, new)
        report.swapped.append((names[0], _type_name(type(module)), _type_name(new_cls)))
    _replace(model, replacements)
    return report


def unswap(model):
    """Replaces, in place, the cnnops.nn.Conv2d / ConvTranspose2d / RoIAlign / RoIPool /
    MultiScaleRoIAlign modules in `model` with torch.nn.Conv2d / ConvTranspose2d /
    torchvision.ops.RoIAlign / RoIPool / MultiScaleRoIAlign, keeping their parameters, buffers,
    hooks and mode as swap() does; returns how many modules were replaced (a shared module
    counts once). Subclasses of the cnnops modules, and the model itself, are not replaced."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"cnnops.unswap: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    targets = {Conv2d: torch.nn.Conv2d, ConvTranspose2d: torch.nn.ConvTranspose2d}
    tv = None
    replacements = {}
    for module, _ in _modules_by_identity(model).values():
        cls = type(module)
        if module is model or cls not in (
            Conv2d,
            ConvTranspose2d,
            RoIAlign,
            RoIPool,
            MultiScaleRoIAlign,
        ):
            continue
        if cls not in targets and tv is None:
            tv = _torchvision_ops()
            if tv is None:
                raise ImportError("cnnops.unswap: restoring RoI modules needs torchvision")
            targets.update({cnnops_cls: tv_cls for tv_cls, cnnops_cls in _roi_classes(tv)})
        new = _rebuild(module, targets[cls], drop=("algo", "backend"))
        if isinstance(getattr(new, "map_levels", None), LevelMapper):
            # torchvision's class declares its own LevelMapper type (for TorchScript).
            m = new.map_levels
            new.map_levels = tv.poolers.LevelMapper(m.k_min, m.k_max, m.s0, m.lvl0, m.eps)
        replacements[id(module)] = (module, new)
    _replace(model, replacements)
    return len(replacements)
