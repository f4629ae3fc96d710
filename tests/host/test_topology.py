"""Block / layer / unit names over the UNets the host builds."""
import pytest

from asdm import inheritance
from asdm import topology
from asdm.harness import models as tm



def unet(**over):
    return tm.sd_model(dict(tm.TINY_UNET, **over)).model.diffusion_model


def test_sd15_names_and_paths():
    t = topology.describe(tm.sd_model(tm.SD15_UNET).model.diffusion_model)
    assert t.blocks == ["dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3"]
    assert t.layers == {"dn0": 2, "dn1": 2, "dn2": 2, "dn3": 2, "mid": 1, "up0": 3, "up1": 3, "up2": 3, "up3": 3}
    names = t.by_name()
    assert names["dn0.0.R"].path == "input_blocks.1.0" and names["dn0.0.A"].path == "input_blocks.1.1"
    assert names["dn1.0.R"].path == "input_blocks.4.0" and names["dn3.1.R"].path == "input_blocks.11.0"
    assert [names[n].path for n in ("mid.R0", "mid.A", "mid.R1")] == ["middle_block.0", "middle_block.1", "middle_block.2"]
    assert names["up0.2.R"].path == "output_blocks.2.0" and names["up3.2.A"].path == "output_blocks.11.1"
    assert "dn3.0.A" not in names and "up0.0.A" not in names   # the deepest pair has no attention
    assert len(t.units) == 8 * 2 - 2 + 3 + 12 * 2 - 3


@pytest.mark.parametrize("over,blocks,layers", [
    # BK-SDM Base: 1 layer per down block, 2 per up block
    (dict(num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0]),
     ["dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3"], {"dn0": 1, "up3": 2, "mid": 1}),
    # BK-SDM Small: Base without the middle block
    (dict(num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0],
          transformer_depth_middle=-2),
     ["dn0", "dn1", "dn2", "dn3", "up0", "up1", "up2", "up3"], {"dn3": 1, "up0": 2}),
    # BK-SDM Tiny: Small without the deepest pair: three levels
    (dict(num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1],
          transformer_depth_middle=-2),
     ["dn0", "dn1", "dn2", "up0", "up1", "up2"], {"dn2": 1, "up2": 2}),
    # a layer-count mix (assembled: SD's 2/3 layers at dn0/up3, Base's 1/2 elsewhere)
    (dict(num_res_blocks=[2, 1, 1, 1], transformer_depth=[1, 1, 1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 0, 0]),
     ["dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3"], {"dn0": 2, "dn1": 1, "up3": 3, "up0": 2}),
])
def test_block_removed_and_mixed_layouts(over, blocks, layers):
    t = topology.describe(unet(**over))
    assert t.blocks == blocks
    assert {k: t.layers[k] for k in layers} == layers


def test_unit_spec_grammar():
    t = topology.describe(unet())
    names = lambda s: [u.name for u in topology.parse_unit_spec(s, t)]
    assert names("dn1.1") == ["dn1.1.R", "dn1.1.A"]
    assert names("up3.*.A") == ["up3.0.A", "up3.1.A", "up3.2.A"]
    assert names("mid") == ["mid.R0", "mid.A", "mid.R1"]
    assert names("mid.A, dn0.0.R") == ["dn0.0.R", "mid.A"]
    assert len(names("dn*.*.R")) == 8
    with pytest.raises(topology.TopologyError, match="'up4' names no unit"):
        names("up4")
    with pytest.raises(topology.TopologyError, match="malformed unit token 'dn0 up3'"):
        names("dn0 up3")


def test_every_preset_resolves_on_sd_layout():
    t = topology.describe(unet())
    sizes = {}
    for name in topology.PRESETS:
        units, skipped = inheritance.resolve_units(t, name, "")
        assert units and not skipped, name
        sizes[name] = {u.name for u in units}
    assert sizes["LI1"] == {f"{b}.1.{k}" for b in ("dn0", "dn1", "dn2", "up0", "up1", "up2", "up3") for k in "RA"} - {"up0.1.A"} | {"dn3.1.R"}
    assert sizes["CO1"] == sizes["DE3"] | sizes["EX2"]
    assert sizes["CO3"] == {u.name for u in t.units if u.block != "up3"}
    assert sizes["CO6"] == {u.name for u in t.units} - {"up3.0.A", "up3.1.A", "up3.2.A"}
    assert not any(n.startswith("up3") for n in sizes["CO5"] if n.endswith(".A"))
