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
static and classmethods class-bound, and refuses to patch a class attribute twice.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, ClassVar

_MARK = "__vllm_chimera_patched__"  # set on each patched vLLM class: {name: (original, was_own)}


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


def is_applied(patch: type[ClassPatch]) -> bool:
    return _MARK in vars(resolve(patch.target))


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
    if _MARK in vars(target_cls):
        raise RuntimeError(f"vllm-chimera: {patch.target} is already patched "
                           f"({sorted(vars(target_cls)[_MARK])}); refusing to patch it twice")
    record = {}
    for name in patch.replaces:
        static_original = inspect.getattr_static(target_cls, name)
        original, installed = _wrap(name, static_original, getattr(patch, name))
        record[name] = (static_original, name in vars(target_cls))
        setattr(target_cls, name, installed)
    patch.setup(target_cls)
    setattr(target_cls, _MARK, record)


def revert(patch: type[ClassPatch]) -> None:
    """Restore the originals (tests use this; a running vLLM never needs it)."""
    target_cls = resolve(patch.target)
    record = vars(target_cls).get(_MARK)
    if record is None:
        return
    patch.teardown(target_cls)
    for name, (static_original, was_own) in record.items():
        if was_own:
            setattr(target_cls, name, static_original)
        else:
            delattr(target_cls, name)
    delattr(target_cls, _MARK)


def original(patch: type[ClassPatch], name: str) -> Any:
    """The vLLM attribute `name` as it was before `patch` replaced it."""
    return vars(resolve(patch.target))[_MARK][name][0]
