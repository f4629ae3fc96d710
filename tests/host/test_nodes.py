"""Every node class of the pack, as ComfyUI loaded it: a category under A-SDM/, a description,
a tooltip on every input and output, a display name, and a function that exists."""
import pytest

from asdm import compat
from asdm.harness import graphs, host


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


def test_every_node_is_a_v3_node_of_the_pinned_api():
    """The pack reaches the host as a V3 extension: ``comfy_entrypoint`` and no
    NODE_CLASS_MAPPINGS (the host's loader would take those first and never ask for the
    entry point); each node a ComfyNode of comfy_api.v0_0_2, registered under its schema's id and
    display name."""
    from comfy_api.v0_0_2 import io
    import nodes
    pack = host.boot()
    assert callable(pack.comfy_entrypoint) and not hasattr(pack, "NODE_CLASS_MAPPINGS")
    for name, cls in pack_classes().items():
        schema = cls.define_schema()
        assert issubclass(cls, io.ComfyNode) and isinstance(schema, io.Schema), name
        assert (schema.node_id, schema.display_name) == (name, cls.TITLE) == (name, nodes.NODE_DISPLAY_NAME_MAPPINGS[name])


def test_file_lists_are_read_when_the_schema_is_asked_for(tmp_path):
    """The front end's refresh asks /object_info again: a file added since shows in the combos
    (the schema is built on each request, not when the pack loads)."""
    from conftest import model_folder
    classes = pack_classes()
    (tmp_path / "added-since.safetensors").write_bytes(b"")

    def listed(node_id, inp):
        return graphs.choices(*classes[node_id].INPUT_TYPES()["required"][inp])
    assert "added-since.safetensors" not in listed("ASDMLoadCompressedUNet", "unet_name")
    with model_folder(compat.unet_folder(), tmp_path):
        assert "added-since.safetensors" in listed("ASDMLoadCompressedUNet", "unet_name")
    with model_folder("asdm_condconv", tmp_path):
        assert "added-since.safetensors" in listed("ASDMMECondConv", "weights")


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
            choices = graphs.choices(v[0], opts)   # a V3 combo: ("COMBO", {"options": [...]})
            if choices is not None and "default" in opts:
                assert opts["default"] in choices, f"{name}.{inp}: default not among the choices"
            if v[0] in ("INT", "FLOAT") and "default" in opts:
                assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30), f"{name}.{inp}"
    if cls.RETURN_TYPES:
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name


# Each node's widgets in the order the front end shows them, and which of them are advanced (folded
# by the current front end). A UI-format graph stores widget values by position, so this order is
# what saved graphs depend on: a node whose inputs must move gets a new id, the old one staying
# (DEPRECATED = True); new inputs go last with a default that keeps saved graphs' meaning.
SURFACE = {
    "ASDMAutoCache": ["speed", "start_percent", "end_percent", "calibration"],
    "ASDMFeatureInheritance2": ["preset", "period", "+units", "+reuse", "+forecast", "+final_full_fraction",
                                "+features_on"],
    "ASDMFeatureInheritance": ["preset", "units", "period", "final_full_steps", "reuse", "forecast",
                               "+features_on"],
    "ASDMUNetSwitch": ["unit", "start_1", "end_1", "start_2", "end_2", "start_3", "end_3", "start_4", "end_4"],
    "ASDMLoadCompressedUNet": ["unet_name", "+prediction", "+zsnr"],
    "ASDMAssembleUNet": ["recipe", "+custom_recipe"],
    "ASDMSaveUNet": ["filename_prefix"],
    "ASDMMECondConv": ["weights", "units", "experts", "+init", "+seed"],
    "ASDMGRIAttention": ["+units", "window", "pool", "+start", "+end"],
    "ASDMLoadEmbeddedModel": [],
}


def widgets(cls):
    spec = cls.INPUT_TYPES()
    return [("+" if v[1].get("advanced") else "") + k for sec in ("required", "optional")
            for k, v in spec.get(sec, {}).items() if graphs.is_widget(v[0])]


def test_node_surfaces():
    classes = pack_classes()
    assert {name: widgets(cls) for name, cls in classes.items()} == SURFACE


def test_search_aliases():
    """Words users search for (newer ComfyUI searches a node's SEARCH_ALIASES; 0.3.64's front end
    searches only the node's id and display name)."""
    classes = pack_classes()
    for name, cls in classes.items():
        aliases = cls.SEARCH_ALIASES
        assert isinstance(aliases, list) and aliases and all(a == a.strip().lower() for a in aliases), name
    assert {"cache", "deepcache", "speed up", "faster", "accelerate"} <= set(classes["ASDMFeatureInheritance2"].SEARCH_ALIASES)
    assert {"cache", "deepcache", "easycache", "speed up"} <= set(classes["ASDMAutoCache"].SEARCH_ALIASES)
    assert {"switch", "bk-sdm"} <= set(classes["ASDMUNetSwitch"].SEARCH_ALIASES)
    assert {"unet loader", "bk-sdm"} <= set(classes["ASDMLoadCompressedUNet"].SEARCH_ALIASES)
    assert "assembly" in classes["ASDMAssembleUNet"].SEARCH_ALIASES
    assert "condconv" in classes["ASDMMECondConv"].SEARCH_ALIASES
    assert {"attention", "windowed attention"} <= set(classes["ASDMGRIAttention"].SEARCH_ALIASES)


def test_seeds_that_are_not_sampling_seeds_get_no_randomize_widget():
    seed = pack_classes()["ASDMMECondConv"].INPUT_TYPES()["required"]["seed"]
    assert seed[1]["control_after_generate"] is False


def test_switch_ranges_show_their_decimals():
    """The front end shows as many decimals as the step has and rounds typed values to "round"."""
    spec = pack_classes()["ASDMUNetSwitch"].INPUT_TYPES()
    ranges = {k: v[1] for sec in spec.values() for k, v in sec.items() if k.startswith(("start_", "end_"))}
    assert len(ranges) == 8
    assert all(o["step"] < 0.1 and o["round"] <= 0.01 for o in ranges.values())


def test_deprecated_feature_inheritance_keeps_old_graphs_meaning():
    classes = pack_classes()
    old, new = classes["ASDMFeatureInheritance"], classes["ASDMFeatureInheritance2"]
    assert old.DEPRECATED is True and not getattr(new, "DEPRECATED", False)
    assert "ASDMFeatureInheritance2" in old.DESCRIPTION and new.TITLE in old.DESCRIPTION
    opt = old.INPUT_TYPES()["optional"]
    # graphs saved before reuse / forecast existed ran residual reuse without forecast
    assert (opt["reuse"][1]["default"], opt["forecast"][1]["default"]) == ("residual", False)
    req = new.INPUT_TYPES()["required"]
    assert [req[k][1]["default"] for k in ("preset", "period", "reuse", "forecast", "final_full_fraction")] == \
        ["EX3", 3, "output", True, 0.0]
    assert (req["final_full_fraction"][1]["min"], req["final_full_fraction"][1]["max"]) == (0.0, 1.0)


def test_both_feature_inheritance_nodes_make_the_same_patch(N, tiny):
    from conftest import holder_of
    old = compat.call_node(N["ASDMFeatureInheritance"], model=tiny, preset="EX3", units="dn0", period=4,
                           final_full_steps=0.2, reuse="output", forecast=True)[0]
    new = compat.call_node(N["ASDMFeatureInheritance2"], model=tiny, preset="EX3", period=4, units="dn0",
                           reuse="output", forecast=True, final_full_fraction=0.2)[0]
    a, b = holder_of(old), holder_of(new)
    assert (a.label, a.schedule, a.reuse, a.forecast, [u.path for u in a.units]) == \
        (b.label, b.schedule, b.reuse, b.forecast, [u.path for u in b.units])
    assert sorted(old.object_patches) == sorted(new.object_patches)
    # a fraction of 1: every step full, the MODEL unchanged (not "1 step", as a tail of 1 is in the old node)
    every = compat.call_node(N["ASDMFeatureInheritance2"], model=tiny, preset="EX3", period=3, units="",
                             reuse="output", forecast=True, final_full_fraction=1.0)[0]
    assert holder_of(every) is None and not every.object_patches
    assert holder_of(compat.call_node(N["ASDMFeatureInheritance2"], model=tiny, preset="EX3", period=3, units="",
                                      reuse="output", forecast=True,
                                      final_full_fraction=0.95)[0]).schedule.tail == 0.95


@pytest.mark.parametrize("kwargs,needle", [
    (dict(final_full_fraction=1.5), "A-SDM Feature Inheritance: final_full_fraction must be a number from 0 to 1 (got 1.5)"),
    (dict(features_on="disk"), "A-SDM Feature Inheritance: features_on must be one of compute, offload"),
])
def test_feature_inheritance_bad_input(N, tiny, kwargs, needle):
    args = dict(preset="EX3", period=3, units="", reuse="output", forecast=True, final_full_fraction=0.0)
    with pytest.raises(ValueError) as e:
        compat.call_node(N["ASDMFeatureInheritance2"], model=tiny, **dict(args, **kwargs))
    assert str(e.value).startswith(needle), str(e.value)
