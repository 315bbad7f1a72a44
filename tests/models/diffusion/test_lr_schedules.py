import math

import pytest

from ldm.models.diffusion.lr_schedules import LambdaLinearScheduler, LambdaWarmUpCosineScheduler2

TWO_CYCLES = dict(warm_up_steps=[10, 5], f_min=[0.1, 0.0], f_max=[1.0, 0.5], f_start=[0.0, 0.2],
                  cycle_lengths=[100, 50])


def test_linear_warm_up_then_linear_decay_per_cycle():
    schedule = LambdaLinearScheduler(**TWO_CYCLES)
    assert schedule(0) == pytest.approx(0.0)
    assert schedule(5) == pytest.approx(0.5)  # half-way through warm-up
    assert schedule(10) == pytest.approx(0.1 + 0.9 * 90 / 100)  # decay counts from the cycle's start
    assert schedule(99) == pytest.approx(0.1 + 0.9 * 1 / 100)
    assert schedule(100) == pytest.approx(0.2)  # the second cycle starts with its own warm-up
    assert schedule(102) == pytest.approx(0.2 + 0.3 * 2 / 5)
    assert schedule(130) == pytest.approx(0.5 * 20 / 50)
    assert schedule(10 ** 6) == pytest.approx(0.0)  # past the last cycle: its end value


def test_warm_up_then_constant_is_the_usual_ldm_setting():
    schedule = LambdaLinearScheduler(warm_up_steps=[100], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                                     cycle_lengths=[10 ** 13])
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(50) == pytest.approx(0.5, rel=1e-5)
    assert schedule(100) == schedule(10 ** 9) == 1.0


def test_cosine_decay_after_warm_up():
    schedule = LambdaWarmUpCosineScheduler2(**TWO_CYCLES)
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 90)))
    assert schedule(99) == pytest.approx(0.1, abs=1e-3)
    assert schedule(125) == pytest.approx(0.25 * (1 + math.cos(math.pi * 20 / 45)))


def test_lists_must_have_one_entry_per_cycle():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[1], f_min=[1.0, 1.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])
