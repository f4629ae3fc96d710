"""The rules the capabilities follow, as plain Python: refresh patterns, switch ranges,
assembly recipes, how a switch merges a model's own options into a call."""
import pytest

from asdm import assembly, inheritance as inh, switch


def test_final_full_steps_as_fraction_or_count():
    # below 1 a fraction of the run's steps (the default 0.2 = the paper's 10 of 50); 1 or more a
    # count of steps, as graphs saved before the fraction keep meaning
    assert inh.Schedule(5, 0.2).pattern(50) == inh.Schedule(5, 10).pattern(50)
    assert inh.Schedule(5, 0.2).pattern(20) == inh.Schedule(5, 4).pattern(20) == "FIIIIFIIIIFIIIIFFFFF"
    assert inh.Schedule(5, 0.2).pattern(10) == "FIIIIFIIFF"
    assert inh.Schedule(5, 10).pattern(10) == "F" * 10


def test_refresh_patterns():
    assert inh.Schedule(2, 0).pattern(12) == "FI" * 6
    assert inh.Schedule(5, 4).pattern(12) == "FIIIIFIIFFFF"
    assert inh.Schedule(1, 0).pattern(5) == "FFFFF"
    # a full step stores only when the next one inherits
    s = inh.Schedule(5, 4)
    assert [st for st in range(12) if s.stores(st, 12)] == [0, 5]


@pytest.mark.parametrize("tail", [-1, 2.5, "10"])
def test_bad_final_full_steps(tail):
    with pytest.raises(inh.InheritanceError, match="final_full_steps"):
        inh.Schedule(5, tail)


def test_switch_ranges():
    R = switch.Range
    assert R(0, 10).steps(25, "steps") == (0, 10) and R(10, switch.TO_END).steps(25, "steps") == (10, 25)
    assert R(0, 0.4).steps(25, "fraction") == (0, 10)
    switch.check_ranges([R(0, 10), R(10, switch.TO_END)], "steps")
    for ranges, needle in [([R(0, 10), R(8, -1)], "overlap"), ([R(0, 10), R(12, -1)], "gap"),
                           ([R(2, 10), R(10, -1)], "must start at 0"), ([R(0, -1), R(10, 20)], "is not the last"),
                           ([R(0, 2.5), R(2.5, -1)], "whole steps")]:
        with pytest.raises(switch.SwitchError, match=needle):
            switch.check_ranges(ranges, "steps")


def test_recipes():
    blocks = ["dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3"]
    m2 = assembly.parse_recipe(assembly.recipe_spec("M2"), blocks)
    assert [b for b in blocks if m2[b] == "B"] == ["dn0", "dn1", "up2", "up3"]
    assert (m2["in"], m2["out"], m2["time"]) == ("B", "B", "A")   # the stem follows its blocks
    assert assembly.recipe_spec("dn0=B") == "dn0=B"
    with pytest.raises(assembly.AssemblyError, match="unknown recipe 'M9'"):
        assembly.recipe_spec("M9")
    with pytest.raises(assembly.AssemblyError, match="malformed recipe entry"):
        assembly.parse_recipe("dn0 B", blocks)


def test_switch_merges_a_models_options_into_the_call():
    call = {"cond_or_uncond": [0, 1], "patches": {"attn1_patch": ["after"]}, "wrappers": {"x": {"k": [1]}}}
    own = {"patches": {"attn1_patch": ["own"], "output_block_patch": ["fu"]}, "wrappers": {"x": {"k": [2]}},
           "asdm_inheritance": "holder"}
    merged = switch.merge_options(call, own)
    assert merged == {"cond_or_uncond": [0, 1], "asdm_inheritance": "holder",
                      "patches": {"attn1_patch": ["after", "own"], "output_block_patch": ["fu"]},
                      "wrappers": {"x": {"k": [1, 2]}}}
    assert call["patches"]["attn1_patch"] == ["after"]   # neither input changes
