"""The engine's pure rules as plain Python: conditioning-chunk keys, the hook protocol's per-call
state, the unit grammar over a layout's names, int8 storage, the error type."""
import pytest
import torch

from asdm import hooks, topology, unet_files
from asdm.errors import ASDMError, GRIError, TopologyError, UNetFileError


# ---------------------------------------------------------------------------------------------
# Conditioning chunks
# ---------------------------------------------------------------------------------------------

def test_chunk_keys_number_repeated_chunks_and_prefer_the_hosts_uuids():
    c = {"transformer_options": {"cond_or_uncond": [1, 0]}}
    assert hooks.chunk_keys(c) == ((1, 0), (0, 0))
    # two conds of one kind in one batched call (area conds, regional prompts): told apart by order
    assert hooks.chunk_keys({"transformer_options": {"cond_or_uncond": [0, 0, 1]}}) == ((0, 0), (0, 1), (1, 0))
    # current ComfyUI gives every cond a uuid: the key that survives batching changes
    to = {"cond_or_uncond": [1, 0], "uuids": ["u-neg", "u-pos"]}
    assert hooks.chunk_keys({"transformer_options": to}) == ("u-neg", "u-pos")
    # a uuid list that does not match the chunks is not used
    to = {"cond_or_uncond": [1, 0], "uuids": ["only-one"]}
    assert hooks.chunk_keys({"transformer_options": to}) == ((1, 0), (0, 0))
    assert hooks.chunk_keys({}) == ((0, 0),)   # a call with no CFG information: one chunk


# ---------------------------------------------------------------------------------------------
# The hook protocol: per-call state that nested calls cannot clobber
# ---------------------------------------------------------------------------------------------

class _Recorder(hooks.Holder):
    KEY = "test_recorder"

    def begin_call(self, run, x, keys):
        return ("call", x)

    def finish_run(self, run):
        self.finished = run


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def next(self, x, t, c):
        return self.fn(x)


@pytest.fixture
def no_sampler(monkeypatch):
    """UNet calls made outside a sampler (the step source is the host's sampler loop)."""
    monkeypatch.setattr(hooks, "current_run", lambda holder: None)


def test_a_nested_call_restores_the_outer_calls_state(no_sampler):
    h = _Recorder()
    seen = []

    def inner(x):
        seen.append(h.call)
        return x

    def outer(x):
        seen.append(h.call)
        h.unet_call(_Call(inner), "inner", 0, {})   # e.g. a wrapper that runs the UNet again
        seen.append(h.call)
        return x

    assert h.unet_call(_Call(outer), "outer", 0, {}) == "outer"
    assert seen == [("call", "outer"), ("call", "inner"), ("call", "outer")] and h.call is None


def test_a_call_that_raises_leaves_no_state_and_a_run_ends_whole(no_sampler):
    h = _Recorder()

    def boom(x):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        h.unet_call(_Call(boom), "x", 0, {})
    assert h.call is None
    run = h.start_run(10)
    assert h.run is run and run.total == 10 and run.step == 0
    h.end_run(run)
    assert h.run is None and h.last_run is run and h.finished is run
    import copy
    assert copy.deepcopy({"holder": h})["holder"] is h   # clones of a MODEL share one holder


# ---------------------------------------------------------------------------------------------
# The unit grammar over a layout's names (SD1.5's, built from the paper's vocabulary)
# ---------------------------------------------------------------------------------------------

def sd15_topology() -> topology.Topology:
    """SD1.5's names: 4 levels, 2 layers per down block and 3 per up block, A units at levels
    0-2, a middle block R A R."""
    units, layers = [], {}
    for k in range(4):
        layers[f"dn{k}"] = 2
        units += [topology.Unit(f"dn{k}.{i}.{kind}", f"dn{k}/{i}/{kind}", kind, f"dn{k}")
                  for i in range(2) for kind in ("RA" if k < 3 else "R")]
    layers["mid"] = 1
    units += [topology.Unit(n, n, n[4], "mid") for n in ("mid.R0", "mid.A", "mid.R1")]
    for k in range(4):
        layers[f"up{k}"] = 3
        units += [topology.Unit(f"up{k}.{i}.{kind}", f"up{k}/{i}/{kind}", kind, f"up{k}")
                  for i in range(3) for kind in ("RA" if k > 0 else "R")]
    blocks = [f"dn{k}" for k in range(4)] + ["mid"] + [f"up{k}" for k in range(4)]
    return topology.Topology(units=units, blocks=blocks, layers=layers)


def test_unit_grammar():
    t = sd15_topology()
    names = lambda s: [u.name for u in topology.parse_unit_spec(s, t)]   # noqa: E731
    assert names("dn1.1") == ["dn1.1.R", "dn1.1.A"]
    assert names("up3.*.A") == ["up3.0.A", "up3.1.A", "up3.2.A"]
    assert names("mid") == ["mid.R0", "mid.A", "mid.R1"]
    assert names("mid.A, dn0.0.R") == ["dn0.0.R", "mid.A"]          # forward order, not the spec's
    assert names("mid.A; dn0.0.R") == names("mid.A, dn0.0.R")
    assert len(names("dn*.*.R")) == 8 and len(names("*.*.A")) == 6 + 9
    with pytest.raises(TopologyError, match="'up4' names no unit"):
        names("up4")
    with pytest.raises(TopologyError, match="'dn3.0.A' names no unit"):
        names("dn3.0.A")
    with pytest.raises(TopologyError, match="malformed unit token 'dn0 up3'"):
        names("dn0 up3")
    assert topology.parse_unit_spec("up4, dn0.0.R", t, strict=False)[0].name == "dn0.0.R"


def test_every_preset_resolves_to_a_unit_set_on_sd15():
    t = sd15_topology()
    for name in topology.PRESETS:
        got = topology.parse_unit_spec(topology.preset_spec(name, t), t, strict=False)
        assert 0 < len(got) < len(t.units), name
    co6 = {u.name for u in topology.parse_unit_spec(topology.preset_spec("CO6", t), t)}
    assert {u.name for u in t.units} - co6 == {"up3.0.A", "up3.1.A", "up3.2.A"}


# ---------------------------------------------------------------------------------------------
# int8 storage (the embedded family's)
# ---------------------------------------------------------------------------------------------

def test_int8_round_trip_is_within_half_a_code_and_keeps_small_tensors():
    g = torch.Generator().manual_seed(0)
    sd = {"conv.weight": torch.randn(16, 8, 3, 3, generator=g) * torch.linspace(0.01, 3, 16)[:, None, None, None],
          "conv.bias": torch.randn(16, generator=g), "tiny.weight": torch.randn(4, 4, generator=g)}
    stored = unet_files.quantize_int8(sd)
    assert stored["conv.weight"].dtype == torch.int8 and stored["conv.weight.int8_scale"].shape == (16,)
    assert torch.equal(stored["conv.bias"], sd["conv.bias"]) and torch.equal(stored["tiny.weight"], sd["tiny.weight"])
    back = unet_files.dequantize_int8(stored)
    assert back.keys() == sd.keys() and back["conv.weight"].dtype == torch.float16
    w = sd["conv.weight"].half().float()
    step = w.abs().flatten(1).amax(1) / 127   # one code, per output channel
    err = (back["conv.weight"].float() - w).abs().flatten(1).amax(1)
    fp16 = w.abs().flatten(1).amax(1) * 2 ** -11   # half of fp16's spacing at the channel's largest value
    assert (err <= step / 2 + fp16).all()          # half a code, read back as fp16


def test_int8_damage_is_refused():
    sd = unet_files.quantize_int8({"w": torch.randn(8, 200)})
    with pytest.raises(UNetFileError, match="no matching per-channel scale"):
        unet_files.dequantize_int8({"w": sd["w"]}, "f.safetensors")
    with pytest.raises(UNetFileError, match="holds int8 scales for missing tensors"):
        unet_files.dequantize_int8({"x": torch.ones(3), "w.int8_scale": sd["w.int8_scale"]}, "f.safetensors")
    with pytest.raises(UNetFileError, match="reserves"):
        unet_files.quantize_int8({"a.int8_scale": torch.ones(3)})


def test_tensor_digest_tells_equal_from_changed_tensors():
    a = {"x": torch.arange(6.0).reshape(2, 3), "s": torch.tensor(3.0)}
    assert unet_files.tensor_digest(a) == unet_files.tensor_digest({k: v.clone() for k, v in a.items()})
    assert unet_files.tensor_digest(a) != unet_files.tensor_digest(dict(a, s=torch.tensor(4.0)))
    assert unet_files.tensor_digest(a) != unet_files.tensor_digest(dict(a, x=a["x"].reshape(3, 2)))
    assert unet_files.tensor_digest(a, ["x"]) == unet_files.tensor_digest({"x": a["x"]})


# ---------------------------------------------------------------------------------------------
# The error type
# ---------------------------------------------------------------------------------------------

def test_errors_are_value_errors_that_name_their_input_once():
    e = GRIError("window must be a whole number", input="window")
    assert isinstance(e, ASDMError) and isinstance(e, ValueError)
    assert e.message() == "window must be a whole number"                 # already leads with it
    assert GRIError("'x' names no unit", input="units").message() == "units: 'x' names no unit"
    assert TopologyError("no input here").message() == "no input here"
