"""Auto Cache's pure rules (asdm/autocache.py): the groups it keeps, the propagation weights, the
predicted error of a plan, the plan it chooses, the run-time rule's budget, profiles as data.
Plain Python: no ComfyUI."""
import json
import math

import pytest
import torch

from asdm import autocache as ac


def line_profile(n_steps=10, groups=2, gains=(1.0, 1.0), bend=0.0):
    """A profile whose group outputs move on a straight line over the steps (F(s) = a + s b, plus
    ``bend`` s^2 c): the forecast from any two steps is exact when ``bend`` is 0."""
    g = torch.Generator().manual_seed(0)
    grams, probes = [], []
    for k in range(groups):
        a, b, c = (torch.randn(32, generator=g, dtype=torch.float64) for _ in range(3))
        feats = [a + s * b + bend * s * s * c for s in range(n_steps)]
        grams.append(ac._gram(feats))
        probes.append([[2, gains[k] * float(feats[2].norm()), float(feats[2].norm())],
                       [7, gains[k] * float(feats[7].norm()), float(feats[7].norm())]])
    sigmas = [14.0 * 0.6 ** s for s in range(n_steps)] + [0.0]
    return ac.Profile(groups=[f"g{k}" for k in range(groups)], schedule=sigmas, steps=list(range(n_steps)),
                      grams=grams, probes=probes)


def test_propagation_follows_the_euler_step():
    # two steps, sigma 2 -> 1 -> 0: the last step passes its whole prediction on; the first adds
    # (1 - 1/2) of its error, and the last step keeps r + (1 - r) s_d^2 / (sigma^2 + s_d^2) of it
    w = ac.propagation([2.0, 1.0, 0.0])
    keep = 0.0 + 1.0 * ac.SIGMA_DATA ** 2 / (1.0 + ac.SIGMA_DATA ** 2)
    assert w == pytest.approx([0.5 * keep, 1.0], rel=1e-12)
    # a denoiser at high noise passes little of its input on: early errors fade
    w = ac.propagation([14.0 * 0.6 ** s for s in range(10)] + [0.0])
    assert w[-1] == 1.0 and w[0] < w[5] < w[-1]


def test_select_keeps_groups_a_share_gap_apart_from_the_outermost():
    shares = [0.05, 0.1, 0.3, 0.35, 0.6, 0.9]
    assert ac.select(shares, gap=0.12) == [1, 3, 4, 5]
    assert ac.select(shares, gap=0.0) == [0, 1, 2, 3, 4, 5]
    assert ac.select([0.0, 0.5], gap=0.12) == [1]   # a group that saves nothing is never used


def test_predicted_error_of_a_plan():
    p = line_profile()
    pred = ac.Predictor(p)
    # refresh at 0 and 1, reuse group 0 at 2 and 3: on a line the forecast is exact
    err, forecast = pred.error([-1, -1, 0, 0, -1, -1, -1, -1, -1, -1])
    b = pred.plain[0][1][0]
    # zero up to cancellation in |c|^2 = c G c (|F|^2 ~ 1e3, G stored to 10 digits): under a
    # thousandth of the stored output's deviation
    assert err < 1e-3 * pred.term[0][2] * b and forecast[2] and forecast[3]
    # only step 0 refreshed before: its stored output, off by |b| per step since it
    err, forecast = pred.error([-1, 0, 0, -1, -1, -1, -1, -1, -1, -1])
    assert pred.plain[0][2][0] == pytest.approx(2 * b, rel=1e-9) and not any(forecast)
    assert err == pytest.approx(pred.term[0][1] * b + pred.term[0][2] * 2 * b, rel=1e-9)
    # reusing a group before anything is stored is impossible
    assert pred.error([0] + [-1] * 9)[0] == math.inf
    # a reused outer group leaves the inner one unrefreshed: it reuses step 0's output at step 2
    err, _ = pred.error([-1, 1, 0, -1, -1, -1, -1, -1, -1, -1])
    assert err == pytest.approx(pred.term[1][1] * pred.plain[1][1][0] + pred.term[0][2] * pred.plain[0][2][0], rel=1e-9)


def test_gain_is_interpolated_between_the_probes_in_sigma():
    p = line_profile(gains=(1.0, 100.0))
    pred = ac.Predictor(p)
    w = ac.propagation(p.schedule)
    for s in (2, 7):   # at a probe: propagation x sigma x the probe's gain per sigma
        assert pred.term[1][s] == pytest.approx(w[s] * 100.0, rel=1e-9)
        assert pred.term[0][s] == pytest.approx(w[s] * 1.0, rel=1e-9)
    # beyond the probes the gain per sigma stays the nearest probe's
    sig = p.schedule
    assert pred.term[0][9] == pytest.approx(w[9] * sig[9] / sig[7], rel=1e-9)
    # between them log(gain / sigma) is interpolated in log sigma: both probes have output change =
    # group output change, so every sigma between them does too
    assert pred.term[0][4] == pytest.approx(w[4], rel=1e-9)


@pytest.mark.parametrize("ratio", [1.2, 1.5, 1.8])
def test_chosen_plan_meets_the_ratio_and_the_window(ratio):
    p = line_profile(bend=0.3)
    pred = ac.Predictor(p)
    shares = [0.3, 0.6]
    allowed = [s not in (0, 5) for s in range(10)]
    plan = ac.choose_plan(pred, shares, ratio, allowed)
    reached = len(plan) / sum(1 - (shares[d] if d >= 0 else 0) for d in plan)
    assert reached >= ratio - 1e-9
    assert plan[0] == ac.FULL and plan[5] == ac.FULL
    # the greedy stops once the ratio is met: its last move saved at most the largest share
    assert reached <= len(plan) / (len(plan) / ratio - max(shares))


def test_the_plan_reuses_what_costs_least_error():
    # group 1's output never changes (zero deviation) while group 0's moves: reuse group 1
    p = line_profile(bend=0.5)
    frozen = torch.ones(32, dtype=torch.float64)
    p.grams[1] = ac._gram([frozen for _ in range(10)])
    p.probes[1] = [[2, 1.0, 1.0], [7, 1.0, 1.0]]
    plan = ac.choose_plan(ac.Predictor(p), [0.4, 0.5], 1.5, [s > 0 for s in range(10)])
    assert set(plan[1:]) <= {ac.FULL, 1} and plan.count(1) >= 5


def test_an_unreachable_ratio_reuses_the_largest_group_everywhere_allowed():
    p = line_profile()
    plan = ac.choose_plan(ac.Predictor(p), [0.3, 0.6], 50.0, [s > 0 for s in range(10)])
    assert plan == [ac.FULL] + [1] * 9


def test_runtime_rule_budget():
    allowed = [s > 0 for s in range(10)]
    rule = ac.RuntimeRule({0: 0.2, 1: 0.5, 2: 0.9}, 2.0, allowed)
    assert rule.target == pytest.approx(5.0)
    # the primary group saves the target reused on REUSE_SHARE of the allowed steps
    assert rule.primary == 2 and set(rule.shares) == {0, 1, 2}
    assert rule.decide(1) is None and rule.interval > 1          # the rule decides
    rule.saved = 5.0
    assert rule.decide(9) == ac.FULL                             # target met: compute
    rule.saved = 4.5
    assert rule.decide(9) == 1                                   # last step: the smallest group that meets it
    rule.saved = 0.0
    assert rule.decide(5) == 2                                   # only reusing from here on can meet it
    assert ac.RuntimeRule({0: 0.2, 1: 0.5}, 2.0, [False] * 10).decide(3) == ac.FULL


def test_runtime_rule_reuses_while_the_change_stays_under_the_pace():
    rule = ac.RuntimeRule({0: 0.9}, 2.0, [s > 0 for s in range(10)])
    rule.interval = 3.0
    h0 = torch.ones(8, dtype=torch.float64)
    assert rule.reuse(0, h0, 1) is False          # nothing to compare with: refresh
    rule.refreshed(0, torch.ones(4, dtype=torch.float64))
    assert rule.ref[0][2] == 1
    assert rule.reuse(0, h0 * 1.01, 2) is True    # change at its own pace, one step of three: reuse
    # a change much faster than its pace: refresh
    rule.pace[0] = 0.001
    rule.PACE = 0.0
    assert rule.reuse(0, h0 * 1.5, 3) is False


def test_profile_json_round_trip_and_damage():
    p = line_profile()
    d = json.loads(json.dumps(p.to_json()))
    assert ac.Profile.from_json(d).to_json() == p.to_json()
    bad = [dict(d, grams=d["grams"][:1]), dict(d, steps=[0]), dict(d, schedule=d["schedule"][:5]),
           dict(d, grams=[[row[:-1] for row in d["grams"][0]], d["grams"][1]]),
           dict(d, probes=[[[1, 2]], d["probes"][1]])]
    nan = json.loads(json.dumps(p.to_json()))
    nan["grams"][0][0][0] = float("nan")
    bad.append(nan)
    for b in bad:
        with pytest.raises(ValueError):
            ac.Profile.from_json(b)
    for b in ({k: v for k, v in d.items() if k != "grams"}, dict(d, groups=None)):
        with pytest.raises((KeyError, TypeError, ValueError)):
            ac.Profile.from_json(b)


def test_profile_names_and_buckets():
    key = {"version": 1, "weights": "abc", "steps": 20}
    assert ac.profile_name(key) == ac.profile_name(dict(key, version=2))   # a stale one is found
    assert ac.profile_name(key) != ac.profile_name(dict(key, steps=21))
    assert ac.resolution_bucket(64, 64) == ac.resolution_bucket(64, 60)
    assert ac.resolution_bucket(64, 64) != ac.resolution_bucket(64, 96)
    assert ac.resolution_bucket(64, 128) != ac.resolution_bucket(128, 64)


def test_weights_digest_sees_a_change_to_any_weight():
    torch.manual_seed(0)
    unet = torch.nn.Module()
    unet.input_blocks = torch.nn.ModuleList([torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)])
    unet.out = torch.nn.Linear(64, 64)
    first = ac.weights_digest(unet)
    assert ac.weights_digest(unet) == first
    with torch.no_grad():   # a LoRA-like update: low rank, dense
        unet.input_blocks[1].weight += 0.01 * torch.randn(64, 1) @ torch.randn(1, 64)
    assert ac.weights_digest(unet) != first
