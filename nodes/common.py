"""What every node module shares: the check of a node's inputs against its own V3 schema, the one
adapter from the engine's errors to a node's message, and the helpers the schemas use."""
import functools
import inspect
import math
import numbers
import unicodedata

from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm.errors import ASDMError

# Why every node checks its inputs itself: the front end keeps widgets within their limits, but a
# prompt sent to the API need not come from it, the host checks min / max and combo choices only
# for values written in the prompt (not for values that arrive over a link), and NaN passes its
# check (NaN < min is false). A value the engine cannot use must be named at the node, not
# surface as a torch or int() error steps later.

_SHOWN_CHOICES = 40   # longer combo lists (file lists) are not spelled out in a message


def node_errors(execute):
    """Decorates a V3 node's ``execute`` (under its ``@classmethod``): the inputs are checked
    against the node's own schema first (``check_inputs``), and an ``ASDMError`` (the engine's,
    or one the node raises about its own inputs) reaches ComfyUI as
    ``ValueError("<the schema's display_name>: <message>")``, the message led by the input it
    concerns. Any other exception is a bug and passes unchanged."""
    positional = [p.name for p in list(inspect.signature(execute).parameters.values())[1:]
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(execute)
    def call(cls, *args, **kwargs):
        # the schema as the host sees it now (file lists read again, as the front end's refresh does)
        schema = cls.define_schema()
        try:
            given = dict(zip(positional, args), **kwargs)
            checked = check_inputs(cls, given, schema)
            args = tuple(checked[n] for n, _ in zip(positional, args)) + args[len(positional):]
            kwargs = {k: checked[k] for k in kwargs}
            return execute(cls, *args, **kwargs)
        except ASDMError as e:
            raise ValueError(f"{schema.display_name}: {e.message()}") from None
    return call


def advanced(inp: io.Input) -> io.Input:
    """``inp`` marked advanced (current front ends fold it; 0.3.64's shows it with the flag in
    its options). The pinned API's inputs take no ``advanced=``; the options an input shows
    (``as_dict``) include its ``extra_dict``, so the flag reaches ``/object_info`` as the V1
    spec's ``"advanced": True`` did."""
    inp.extra_dict["advanced"] = True
    return inp


def check_inputs(cls, given: dict, schema=None) -> dict:
    """``given`` (input name -> value, as the executor passes them) checked against the node's
    declared inputs (a V3 node's schema, ``schema`` or its ``define_schema()``; a V1 class's
    ``INPUT_TYPES()``): INT and FLOAT values are finite numbers (not booleans) within the
    spec's min / max, INT values whole (a whole float comes back as an int, as the host's own
    validation converts it); combo values are among the choices; STRING values are text, and
    those named in ``cls.PATH_INPUTS`` (strings that become file paths) hold no control
    characters. Inputs not given (optional ones left unconnected) and types without a value
    check (MODEL, ...) pass. Returns the values the node's ``execute`` gets; the first bad one
    raises ``ASDMError`` naming its input."""
    out = dict(given)
    paths = set(getattr(cls, "PATH_INPUTS", ()))
    for name, kind, opts in _specs(cls, schema):
        if name not in given:
            continue
        value = given[name]
        if kind in ("INT", "FLOAT"):
            out[name] = _number(name, kind == "INT", opts, value)
        elif kind == "STRING":
            _text(name, value, name in paths, opts)
        else:
            choices = _choices(kind, opts)
            if choices is not None:
                _choice(name, value, choices)
    return out


def _specs(cls, schema=None):
    """(name, type, options) of each required and optional input, in the node's order. A V3
    node's come from its schema, each input as the host shows it (the type and options of its
    ``/object_info`` entry: combos as ("COMBO", {"options": [...]})); a V1 class's from its
    ``INPUT_TYPES()`` in any of the V1 spec forms: ("INT", {...}), ([choices], {...}),
    ("COMBO", {"options": [...]}), ("MODEL",)."""
    if schema is not None or hasattr(cls, "define_schema"):
        for inp in (schema or cls.define_schema()).inputs or ():
            yield inp.id, str(inp.get_io_type()), inp.as_dict()
        return
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            if not isinstance(spec, (tuple, list)) or not spec:
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            yield name, spec[0], opts


def _choices(kind, opts):
    if isinstance(kind, (list, tuple)):
        return list(kind)
    if kind == "COMBO" and isinstance(opts.get("options"), (list, tuple)):
        return list(opts["options"])
    return None


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, whole: bool, opts: dict, value):
    lo, hi = opts.get("min"), opts.get("max")
    what = "a whole number" if whole else "a number"
    if lo is not None and hi is not None:
        what += f" from {_fmt(lo)} to {_fmt(hi)}"
    elif lo is not None:
        what += f" of at least {_fmt(lo)}"
    elif hi is not None:
        what += f" of at most {_fmt(hi)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ASDMError(f"{name} must be {what} (got {type(value).__name__} {_fmt(value)})", input=name)
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ASDMError(f"{name} must be {what} (got {value})", input=name)
    if whole and value != int(value):
        raise ASDMError(f"{name} must be {what} (got {_fmt(value)})", input=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ASDMError(f"{name} must be {what} (got {_fmt(value)})", input=name)
    return int(value) if whole and not isinstance(value, numbers.Integral) else value


def _text(name: str, value, path: bool, opts: dict) -> None:
    if not isinstance(value, str):
        raise ASDMError(f"{name} must be text (got {type(value).__name__} {_fmt(value)})", input=name)
    if not path:
        return
    for i, ch in enumerate(value):
        # Cc: NUL, newlines, tabs, escapes (the OS refuses NUL; the rest make names no one can
        # type); Cs: a lone surrogate, which no file system encoding can write
        if unicodedata.category(ch) in ("Cc", "Cs"):
            example = f", e.g. {opts['default']}" if opts.get("default") else ""
            raise ASDMError(f"{name} holds a control character ({ascii(ch)} at character {i + 1}), which "
                            f"a file name cannot hold; write it in ordinary characters{example}", input=name)


def _choice(name: str, value, choices: list) -> None:
    try:
        if value in choices:
            return
    except TypeError:   # an unhashable or uncomparable value is no choice
        pass
    if not choices:
        raise ASDMError(f"{name}: {_fmt(value)} is not available: this input lists nothing to choose "
                        "(for a file: put it in its models folder and refresh the page)", input=name)
    if len(choices) > _SHOWN_CHOICES:
        shown = ", ".join(str(c) for c in choices[:3])
        raise ASDMError(f"{name}: {_fmt(value)} is not one of the {len(choices)} entries this input lists "
                        f"({shown}, ...); choose one from the node's list (refresh the page if it should "
                        "be there)", input=name)
    raise ASDMError(f"{name} must be one of {', '.join(str(c) for c in choices)} (got {_fmt(value)})",
                    input=name)
