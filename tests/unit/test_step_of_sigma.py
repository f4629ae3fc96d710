"""The step of a model evaluation from its sigma against the schedule (compat.step_of_sigma), the
fallback where no sampler loop is found: a schedule point starts its step, a sigma between two
points belongs to the step that starts above it, churn above sigma_0 is step 0."""
from asdm.compat import step_of_sigma

SCHEDULE = [14.6, 7.0, 3.0, 1.0, 0.0]   # 4 steps


def test_schedule_points_start_their_step():
    assert [step_of_sigma(s, SCHEDULE) for s in SCHEDULE[:-1]] == [0, 1, 2, 3]


def test_points_within_rounding_and_midpoints():
    assert step_of_sigma(7.0 * (1 + 1e-7), SCHEDULE) == 1   # float rounding of sigmas[i] * s_in
    assert step_of_sigma(5.0, SCHEDULE) == 1                 # dpm_2's midpoint of step 1
    assert step_of_sigma(0.5, SCHEDULE) == 3
    assert step_of_sigma(20.0, SCHEDULE) == 0                # churn raised sigma_0


def test_one_step_schedule():
    assert step_of_sigma(1.0, [1.0, 0.0]) == 0
