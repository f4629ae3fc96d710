"""SDXL's family in the engine's pure rules: recipes as level pairs on 4 and 3 levels, which
UNet configs are a family the nodes take (and why the others are refused)."""
import pytest

from asdm import assembly, unet_files
from asdm.harness import models as tm

SD = ["dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3"]
XL = ["dn0", "dn1", "dn2", "mid", "up0", "up1", "up2"]


def from_b(recipe, blocks):
    choice = assembly.parse_recipe(assembly.recipe_spec(recipe), blocks)
    return [b for b in blocks if choice[b] == "B"], (choice["in"], choice["time"], choice["out"])


def test_named_recipes_are_mirror_pairs_on_every_layout():
    # SD1.5: what M1 / M2 / M3 always named (dn0 + up3; dn0, dn1, up2, up3; three pairs)
    assert from_b("M1", SD) == (["dn0", "up3"], ("B", "A", "B"))
    assert from_b("M2", SD) == (["dn0", "dn1", "up2", "up3"], ("B", "A", "B"))
    assert from_b("M3", SD) == (["dn0", "dn1", "dn2", "up1", "up2", "up3"], ("B", "A", "B"))
    # SDXL's 3 levels: the analogous pairs; M3 is every pair, SDXL's middle block and time kept
    assert from_b("M1", XL) == (["dn0", "up2"], ("B", "A", "B"))
    assert from_b("M2", XL) == (["dn0", "dn1", "up1", "up2"], ("B", "A", "B"))
    assert from_b("M3", XL) == (["dn0", "dn1", "dn2", "up0", "up1", "up2"], ("B", "A", "B"))
    # the pair grammar in a custom recipe, beside block names
    assert from_b("pair1=B, mid=B", XL)[0] == ["dn1", "mid", "up1"]


def test_recipes_that_leave_nothing_of_a_or_name_missing_pairs_are_refused():
    no_mid = ["dn0", "dn1", "dn2", "up0", "up1", "up2"]
    with pytest.raises(assembly.AssemblyError, match="every block of this 3-level UNet from B .*no middle block"):
        assembly.parse_recipe(assembly.recipe_spec("M3"), no_mid)
    assert set(assembly.parse_recipe("*=B", no_mid).values()) == {"B"}   # asked for outright: B rebuilt
    with pytest.raises(assembly.AssemblyError, match="names level pair 3, but this UNet has 3 levels"):
        assembly.parse_recipe("pair3=B", XL)
    with pytest.raises(assembly.AssemblyError, match="gives up1 twice"):
        assembly.parse_recipe("pair1=B, up1=A", XL)


@pytest.mark.parametrize("name", list(tm.SDXL_UNETS))
def test_sdxl_family_at_real_and_narrow_width(name):
    assert unet_files.family_of(tm.SDXL_UNETS[name]) == "SDXL"
    assert unet_files.family_of(tm.TINY_SDXL[name]) == "SDXL"   # another text width: the same family


@pytest.mark.parametrize("change,needle", [
    (dict(adm_in_channels=2560, context_dim=1280, model_channels=384), "SDXL Refiner"),
    (dict(use_temporal_attention=True), "video UNet"),
    (dict(in_channels=9), "9 input channels .*inpainting"),
    (dict(in_channels=8), "8 input channels .*instruct-pix2pix"),
    (dict(adm_in_channels=1536, context_dim=1024), "class embedding y 1536 wide .*unCLIP"),
])
def test_other_unets_with_a_y_are_refused_with_the_reason(change, needle):
    with pytest.raises(unet_files.UNetFileError, match=needle):
        unet_files.family_of(dict(tm.SDXL_UNETS["sdxl"], **change))


def test_sd_families_are_unchanged():
    assert unet_files.family_of(tm.SD15_UNET) == "SD1"
    assert unet_files.family_of(dict(tm.SD15_UNET, context_dim=1024, use_linear_in_transformer=True)) == "SD2"
    assert unet_files.family_of(tm.TINY_UNET) == "embedded"


def test_layouts_name_their_family():
    assert set(assembly.LAYOUTS) == {"base", "small", "tiny", "koala-700m", "koala-1b"}
    assert set(assembly.BKSDM_LAYOUTS) == {"base", "small", "tiny"}
    k7, k1 = assembly.LAYOUTS["koala-700m"], assembly.LAYOUTS["koala-1b"]
    # KOALA's own configs (the host's KOALA_700M / KOALA_1B): depths per level, middle block
    assert k7.depths == tuple(tm.SDXL_UNETS["koala-700m"]["transformer_depth"]) and k7.mid is False
    assert k1.depths == tuple(tm.SDXL_UNETS["koala-1b"]["transformer_depth"])
    assert k1.mid == tm.SDXL_UNETS["koala-1b"]["transformer_depth_middle"]
