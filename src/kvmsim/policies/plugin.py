"""A user's own policy: ``--policy path/to/file.py:ClassName`` or ``--policy module:ClassName``.

A patch author subclasses a shipped policy (:class:`~kvmsim.policies.series.SeriesPolicy`,
:class:`~kvmsim.policies.legacy.LegacyPolicy`), overrides the hooks their patch changes and runs the
scenario library, the explorer and the benchmark against it (docs/policies.md, "Writing your own
policy"; docs/examples/).  The plugin goes through the same seam as the shipped policies: resolved once
per VM into ``kvm.ops`` by :func:`kvmsim.policies.resolve`.

Everything is checked when the plugin is loaded, before the first run, and reported as a
:class:`PluginError` (a :class:`~kvmsim.errors.UsageError`: exit status 2, never a traceback) naming
the file and, where there is one, the line and the hook: a missing file or module, an import that
raised (a syntax error: its line), a missing class, a class that is not a policy (the required hooks
it lacks), a hook whose parameters differ from :class:`~kvmsim.policies.Policy`'s.

At run time each hook the plugin defines itself (and each callable its ``fault_release`` /
``fault_release_bulk`` returns from the plugin's file) is wrapped: an exception other than a
:class:`~kvmsim.errors.KvmsimError` becomes a :class:`PluginHookError` naming the hook and the
plugin's file:line; a :class:`~kvmsim.errors.ModelError` (the modelled kernel's errno) keeps its type
and errno and its message gains the hook's name.

A loaded plugin is registered under its display name (its own ``name`` attribute, or its class name
when it only inherits one), so ``get_policy(name)`` finds it again in the runner, the explorer and the
benchmark's forked worker.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import traceback

from kvmsim.errors import KvmsimError, ModelError, UsageError


class PluginError(UsageError):
    """A ``--policy`` plugin could not be loaded or is not a policy."""


class PluginHookError(PluginError):
    """A plugin's hook raised an exception that is not the model's own."""


#: display name → plugin class, for every plugin loaded in this process.
_REGISTRY: dict[str, type] = {}
#: spec → display name.
_LOADED: dict[str, str] = {}

def required_hooks() -> dict[str, inspect.Signature]:
    """Each hook of :class:`kvmsim.policies.Policy` with its signature (``self`` dropped)."""
    from kvmsim.policies import Policy
    out = {}
    for name, fn in vars(Policy).items():
        if name.startswith("_") or not inspect.isfunction(fn):
            continue
        out[name] = _drop_self(inspect.signature(fn))
    return out


#: Attributes a policy must have besides its hooks.
REQUIRED_ATTRS = ("mmu_613_other",)


def is_plugin_spec(spec: str) -> bool:
    """A spec naming a plugin (``file.py:Class``, ``module:Class``, ``file.py``) rather than a shipped name."""
    return ":" in spec or spec.endswith(".py")


def _drop_self(sig: inspect.Signature) -> inspect.Signature:
    params = list(sig.parameters.values())[1:]
    return sig.replace(parameters=params)


def _shape(sig: inspect.Signature) -> list[tuple[str, inspect._ParameterKind, bool]]:
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]


def _params_text(sig: inspect.Signature) -> str:
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def _where(obj) -> str:
    """``file:line`` of a function or class, or the best available."""
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (OSError, TypeError):
        return getattr(obj, "__qualname__", repr(obj))


def _import_file(path: str):
    if not os.path.exists(path):
        raise PluginError(f"policy plugin {path}: no such file")
    if not os.path.isfile(path):
        raise PluginError(f"policy plugin {path}: not a file")
    modname = "kvmsim_policy_plugin_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"policy plugin {path}: cannot be imported (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[modname]
        raise PluginError(f"{e.filename or path}:{e.lineno}: policy plugin has a syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 -- the user's module raised while importing: report file:line
        del sys.modules[modname]
        raise PluginError(f"{_raise_site(e, path)}: importing the policy plugin raised "
                          f"{type(e).__name__}: {e}") from None
    return module


def _raise_site(exc: BaseException, path: str | None = None) -> str:
    """``file:line`` of the innermost frame of ``exc`` in ``path`` (or the innermost frame at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        real = os.path.realpath(path)
        mine = [f for f in frames if os.path.realpath(f.filename) == real]
        if mine:
            return f"{mine[-1].filename}:{mine[-1].lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else (path or "?")


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise PluginError(f"policy plugin module {name!r}: no such module (not on sys.path / PYTHONPATH)") from None
        raise PluginError(f"policy plugin module {name!r}: importing it raised {type(e).__name__}: {e} "
                          f"({_raise_site(e)})") from None
    except SyntaxError as e:
        raise PluginError(f"{e.filename}:{e.lineno}: policy plugin has a syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 -- the user's module raised while importing
        raise PluginError(f"{_raise_site(e)}: importing policy plugin module {name!r} raised "
                          f"{type(e).__name__}: {e}") from None


def display_name(cls: type) -> str:
    """The plugin's ``name`` if its class (or a plugin base) sets one, else the class name."""
    from kvmsim.policies import shipped_policies
    shipped = set(shipped_policies().values())
    for klass in cls.__mro__:
        if klass in shipped or klass is object:
            break
        if isinstance(vars(klass).get("name"), str):
            return vars(klass)["name"]
    return cls.__name__


def check_policy_class(cls, where: str) -> None:
    """Raise :class:`PluginError` unless ``cls`` has every hook of the protocol with its parameters."""
    if not inspect.isclass(cls):
        raise PluginError(f"policy plugin {where}: is a {type(cls).__name__}, not a class")
    hooks = required_hooks()
    missing = [h for h in hooks if not callable(getattr(cls, h, None))]
    missing += [a for a in REQUIRED_ATTRS if not hasattr(cls, a)]
    if missing:
        raise PluginError(f"policy plugin {where}: {cls.__name__} is not a policy: missing "
                          f"{', '.join(missing)} (subclass kvmsim.policies.series.SeriesPolicy or "
                          f"kvmsim.policies.legacy.LegacyPolicy and override only the hooks your patch changes)")
    for hook, want in hooks.items():
        fn = inspect.getattr_static(cls, hook)
        if isinstance(fn, (staticmethod, classmethod)):
            raise PluginError(f"{_where(fn.__func__)}: policy plugin hook {cls.__name__}.{hook} must be a plain "
                              f"method (self first), taking {_params_text(want)} after self")
        if not inspect.isfunction(fn):
            continue
        got = _drop_self(inspect.signature(fn))
        if _shape(got) != _shape(want):
            raise PluginError(f"{_where(fn)}: policy plugin hook {cls.__name__}.{hook} has parameters "
                              f"{_params_text(got)}; the Policy protocol (kvmsim/policies/__init__.py) expects "
                              f"{_params_text(want)}")


def load_plugin(spec: str) -> str:
    """Load, check and register the plugin ``spec`` names; returns its display name (idempotent)."""
    if spec in _LOADED:
        return _LOADED[spec]
    target, _, clsname = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if target.endswith(".py") or os.sep in target or (target and os.path.exists(target)):
        module = _import_file(target)
        where = target
    elif target:
        module = _import_module(target)
        where = target
    else:
        raise PluginError(f"policy plugin {spec!r}: expected path/to/file.py:ClassName or module:ClassName")
    if not clsname:
        from kvmsim.policies import shipped_policies
        shipped = set(shipped_policies().values())
        found = [v for v in vars(module).values()
                 if inspect.isclass(v) and v.__module__ == module.__name__ and v not in shipped]
        if len(found) != 1:
            raise PluginError(f"policy plugin {where}: name the class, {where}:ClassName "
                              f"({'classes: ' + ', '.join(c.__name__ for c in found) if found else 'it defines no class'})")
        cls = found[0]
    else:
        cls = getattr(module, clsname, None)
        if cls is None:
            classes = [n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")]
            raise PluginError(f"policy plugin {where}: no class {clsname!r}"
                              + (f" (it defines: {', '.join(classes)})" if classes else ""))
    check_policy_class(cls, f"{where}:{getattr(cls, '__name__', clsname)}")
    name = display_name(cls)
    from kvmsim.policies import shipped_policies
    if name in shipped_policies():
        raise PluginError(f"policy plugin {where}:{cls.__name__}: name {name!r} is a shipped policy's; "
                          f"give the class its own name attribute")
    other = _REGISTRY.get(name)
    if other is not None and other is not cls:
        raise PluginError(f"policy plugin {where}:{cls.__name__}: name {name!r} is already taken by "
                          f"{_where(other)}")
    _REGISTRY[name] = cls
    _LOADED[spec] = name
    return name


def registered(name: str) -> type | None:
    return _REGISTRY.get(name)


# ---- run time ----------------------------------------------------------------------------------------

def _own_file(fn) -> str | None:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code.co_filename if code is not None else None


def _guard(fn, hook: str, policy_name: str):
    """``fn`` with its non-model exceptions reported as :class:`PluginHookError` naming ``hook``."""
    plugin_file = _own_file(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModelError as e:
            if not getattr(e, "_kvmsim_hook", None):
                e._kvmsim_hook = hook
                e.args = (f"{e.args[0] if e.args else e} (in policy plugin {policy_name!r} hook {hook})",)
            raise
        except KvmsimError:
            raise
        except Exception as e:  # noqa: BLE001 -- the user's hook broke: name it, and where
            raise PluginHookError(f"policy plugin {policy_name!r} hook {hook} raised {type(e).__name__}: {e} "
                                  f"({_raise_site(e, plugin_file)})") from e
    return call


def instantiate(cls: type) -> object:
    """A plugin policy object whose own hooks are guarded (:func:`_guard`)."""
    from kvmsim.policies import shipped_policies
    shipped = set(shipped_policies().values())
    name = display_name(cls)
    try:
        obj = cls()
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"{_raise_site(e)}: policy plugin {cls.__name__}() raised {type(e).__name__}: {e}") from None
    own = set()
    for klass in cls.__mro__:
        if klass in shipped or klass is object:
            break
        own.update(n for n, v in vars(klass).items() if inspect.isfunction(v) and not n.startswith("__"))
    plugin_files = {_own_file(getattr(cls, n)) for n in own}
    module = sys.modules.get(cls.__module__)
    if getattr(module, "__file__", None):
        plugin_files.add(module.__file__)
    if "arch_ops" not in own:                            # an ARCH_OPS table naming the plugin's own namespace
        object.__setattr__(obj, "arch_ops", _wrap_arch_ops(obj.arch_ops, plugin_files, name))
    for hook in own:
        fn = getattr(obj, hook)
        if hook == "fault_release":
            fn = _wrap_returned(fn, ("fault_release_locked", "fault_release_unlocked", "fault_dirty_before_map"),
                                plugin_files, name)
        elif hook == "fault_release_bulk":
            fn = _wrap_returned(fn, ("fault_release_bulk",), plugin_files, name)
        elif hook == "arch_ops":
            fn = _wrap_arch_ops(fn, plugin_files, name)
        object.__setattr__(obj, hook, _guard(fn, hook, name))
    return obj


def _wrap_returned(fn, slots, plugin_files, name):
    """``fault_release(arch)``'s returned callables, guarded when they come from the plugin's file."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not isinstance(out, tuple):
            return out
        return tuple(_guard(f, slot, name) if callable(f) and _own_file(f) in plugin_files else f
                     for f, slot in zip(out, slots + ("",) * (len(out) - len(slots))))
    return call


def _wrap_arch_ops(fn, plugin_files, name):
    """``arch_ops(arch)``'s namespace with the callables defined in the plugin's files guarded, each
    named ``arch_ops(ARCH).FIELD`` in an error."""
    @functools.wraps(fn)
    def call(arch):
        ns = fn(arch)
        if ns is None or not dataclasses.is_dataclass(ns):
            return ns
        mine = {f.name: getattr(ns, f.name) for f in dataclasses.fields(ns)
                if callable(getattr(ns, f.name)) and _own_file(getattr(ns, f.name)) in plugin_files}
        if not mine:
            return ns
        return dataclasses.replace(ns, **{k: _guard(v, f"arch_ops({arch}).{k}", name) for k, v in mine.items()})
    return call
