"""The machinery for patching vLLM classes: declarative, reversible, never twice.

A patch is a subclass of `ClassPatch` naming ONE vLLM class (`target = "module:Class"`)
and the attributes it replaces (`replaces = ("__post_init__", "use_eagle")`). For each
name, the patch class defines a function of the same name whose first argument is the
original (the vLLM function), followed by vLLM's own arguments:

    class SpeculativeConfigPatch(ClassPatch):
        target = "vllm.config.speculative:SpeculativeConfig"
        replaces = ("use_eagle",)

        @staticmethod
        def use_eagle(original, self):
            return original(self) or self.method == "chimera"

`apply` keeps every original (for `revert` and for the wrappers), keeps staticmethods
static and classmethods class-bound, and refuses to patch a class attribute twice. Two
patch classes may share a vLLM class when they replace different attributes (the runner
has Chimera's tree verification and, in chimera-bench only, the step timing); a patch is
applied at most once, and patches of one class are reverted in the reverse order.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, ClassVar

# Set on each patched vLLM class: {patch class name: {attribute: (original, was_own)}}.
_MARK = "__vllm_chimera_patched__"


class ClassPatch:
    target: ClassVar[str]  # "package.module:ClassName"
    replaces: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def setup(cls, target_cls: type) -> None:
        """Changes that are not method replacements (optional); `teardown` undoes them."""

    @classmethod
    def teardown(cls, target_cls: type) -> None:
        """Undo `setup`."""


def resolve(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _records(target_cls: type) -> dict[str, dict[str, tuple[Any, bool]]]:
    return vars(target_cls).get(_MARK, {})


def is_applied(patch: type[ClassPatch]) -> bool:
    return patch.__qualname__ in _records(resolve(patch.target))


def _wrap(name: str, static_original: Any, replacement: Callable) -> tuple[Any, Any]:
    """(the callable original, the attribute to install) for one replaced attribute."""
    if name == "__new__":
        # Inherited object.__new__ must be called with the class alone.
        original = static_original if static_original is not object.__new__ else object.__new__
        return original, staticmethod(lambda cls, *a, **k: replacement(original, cls, *a, **k))
    if isinstance(static_original, staticmethod):
        original = static_original.__func__
        wrapper = functools.wraps(original)(lambda *a, **k: replacement(original, *a, **k))
        return original, staticmethod(wrapper)
    if isinstance(static_original, classmethod):
        original = static_original.__func__
        wrapper = functools.wraps(original)(lambda cls, *a, **k: replacement(
            original.__get__(cls), *a, **k))
        return original, classmethod(wrapper)
    if isinstance(static_original, property):
        original = static_original.fget
        return original, property(functools.wraps(original)(lambda self: replacement(original, self)))
    original = static_original
    return original, functools.wraps(original)(lambda self, *a, **k: replacement(original, self, *a, **k))


def apply(patch: type[ClassPatch]) -> None:
    target_cls = resolve(patch.target)
    records = _records(target_cls)
    if patch.__qualname__ in records:
        raise RuntimeError(f"vllm-chimera: {patch.target} is already patched by "
                           f"{patch.__qualname__}; refusing to patch it twice")
    taken = {name: other for other, record in records.items() for name in record}
    clashes = sorted(set(patch.replaces) & set(taken))
    if clashes:
        raise RuntimeError(f"vllm-chimera: {patch.target}.{clashes[0]} is already patched by "
                           f"{taken[clashes[0]]}; {patch.__qualname__} may not patch it again")
    record = {}
    for name in patch.replaces:
        static_original = inspect.getattr_static(target_cls, name)
        original, installed = _wrap(name, static_original, getattr(patch, name))
        record[name] = (static_original, name in vars(target_cls))
        setattr(target_cls, name, installed)
    patch.setup(target_cls)
    setattr(target_cls, _MARK, {**records, patch.__qualname__: record})


def revert(patch: type[ClassPatch]) -> None:
    """Restore the originals (tests use this; a running vLLM never needs it)."""
    target_cls = resolve(patch.target)
    records = dict(_records(target_cls))
    record = records.pop(patch.__qualname__, None)
    if record is None:
        return
    patch.teardown(target_cls)
    for name, (static_original, was_own) in record.items():
        if was_own:
            setattr(target_cls, name, static_original)
        else:
            delattr(target_cls, name)
    if records:
        setattr(target_cls, _MARK, records)
    else:
        delattr(target_cls, _MARK)


def original(patch: type[ClassPatch], name: str) -> Any:
    """The vLLM attribute `name` as it was before `patch` replaced it."""
    return _records(resolve(patch.target))[patch.__qualname__][name][0]
