"""Every node class of the pack, as ComfyUI loaded it: a category under A-SDM/, a description,
a tooltip on every input and output, a display name, and a function that exists."""
import pytest

from asdm.harness import host


def pack_classes():
    pack = host.boot().__name__   # first: ComfyUI's own nodes module comes with the host
    import nodes
    return {name: cls for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if cls.__module__.startswith(pack + ".")}


def test_the_pack_registers_its_nodes():
    names = set(pack_classes())
    import nodes
    assert {"ASDMFeatureInheritance", "ASDMUNetSwitch", "ASDMLoadCompressedUNet", "ASDMAssembleUNet",
            "ASDMSaveUNet", "ASDMMECondConv", "ASDMLoadEmbeddedModel"} <= names
    for name in names:
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("A-SDM "), name


@pytest.mark.parametrize("name", sorted(pack_classes()))
def test_node_definition_is_complete(name):
    cls = pack_classes()[name]
    assert cls.CATEGORY.startswith("A-SDM/") and len(cls.DESCRIPTION) > 40, name
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for inp, v in spec.get(section, {}).items():
            opts = v[1] if len(v) > 1 else {}
            assert len(opts.get("tooltip", "")) > 10, f"{name}.{inp} has no tooltip"
            if isinstance(v[0], list) and "default" in opts:
                assert opts["default"] in v[0], f"{name}.{inp}: default not among the choices"
            if v[0] in ("INT", "FLOAT") and "default" in opts:
                assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30), f"{name}.{inp}"
    if cls.RETURN_TYPES:
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
