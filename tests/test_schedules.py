"""k schedules: each schedule's step -> method map, text round trips, errors that say what
to write."""

from __future__ import annotations

import pytest

from highwaybp import Exact, FixedPoint, Highway
from highwaybp.schedules import (
    Adaptive,
    Constant,
    Finish,
    Linear,
    Schedule,
    Steps,
    method_to_string,
    schedule_from_string,
)


def test_constant_is_the_same_method_at_every_step():
    s = Constant(Highway(k=2))
    assert [s(t) for t in (0, 1, 10_000)] == [Highway(k=2)] * 3
    assert s.to_string() == "highway:k=2"


def test_steps_switches_at_each_milestone():
    s = Steps({0: Highway(k=1), 1000: Highway(k=3), 4000: Exact()})
    got = {t: s(t) for t in (0, 999, 1000, 3999, 4000, 10**6)}
    assert got == {
        0: Highway(k=1),
        999: Highway(k=1),
        1000: Highway(k=3),
        3999: Highway(k=3),
        4000: Exact(),
        10**6: Exact(),
    }


def test_steps_milestone_order_does_not_matter():
    a = Steps({4000: Exact(), 0: Highway(k=1), 1000: FixedPoint(k=2)})
    assert a(1500) == FixedPoint(k=2)
    assert a == Steps({0: Highway(k=1), 1000: FixedPoint(k=2), 4000: Exact()})


def test_linear_rises_rounds_and_holds():
    s = Linear(0, 4, steps=2000)
    # k(t) = round(4 t / 2000), half-way up; held at 4 after step 2000
    assert [s.k_at(t) for t in (0, 249, 250, 750, 1000, 1999, 2000, 9999)] == [
        0, 0, 1, 2, 2, 4, 4, 4,
    ]  # fmt: skip
    assert s(1000) == Highway(k=2)
    down = Linear(4, 0, steps=4)
    assert [down.k_at(t) for t in range(6)] == [4, 3, 2, 1, 0, 0]


def test_finish_runs_exact_for_the_last_steps_only():
    s = Finish(Linear(0, 2, steps=10), exact_last=3)
    methods = [s.method_at(t, total_steps=10) for t in range(10)]
    assert methods[:7] == [Linear(0, 2, 10)(t) for t in range(7)]
    assert methods[7:] == [Exact()] * 3
    with pytest.raises(ValueError, match="total_steps"):
        s.method_at(0)


def test_adaptive_has_no_fixed_map_and_says_to_use_the_controller():
    with pytest.raises(TypeError, match="KController"):
        Adaptive()(0)
    assert Adaptive().k_max == 8  # None means 8
    assert Adaptive(k_min=3, k_start=4).initial_state().k == 4


ROUND_TRIPS = [
    Constant(Exact()),
    Constant(Highway(k=0)),
    Constant(FixedPoint(k=3)),
    Constant(Highway(tol=1e-3, max_k=20, fallback="best")),
    Steps({0: Highway(k=1), 1000: Highway(k=3), 4000: Exact()}),
    Steps({0: Highway(tol=0.001, max_k=20), 50: Exact()}),
    Linear(0, 4, 2000),
    Linear(5, 1, 7),
    Finish(Linear(0, 4, 2000), exact_last=200),
    Finish(Steps({0: Highway(k=1), 9: FixedPoint(k=2)}), exact_last=1),
    Adaptive(),
    Adaptive(target_cosine=0.95, probe_every=7, k_min=1, k_max=6, k_start=2, rise=3.0, window=4),
    Adaptive(rise=float("inf")),
]


@pytest.mark.parametrize("schedule", ROUND_TRIPS, ids=lambda s: s.to_string())
def test_text_round_trip(schedule: Schedule):
    text = schedule.to_string()
    again = schedule_from_string(text)
    assert again == schedule
    assert type(again) is type(schedule)
    assert again.to_string() == text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("exact", Constant(Exact())),
        ("highway:3", Constant(Highway(k=3))),
        ("constant:fixedpoint:k=2", Constant(FixedPoint(k=2))),
        ("linear:0,4,2000", Linear(0, 4, 2000)),
        (
            "steps:0=highway:k=1,1000=highway:k=3,4000=exact",
            Steps({0: Highway(k=1), 1000: Highway(k=3), 4000: Exact()}),
        ),
        (
            "steps:0=highway:tol=1e-3,max_k=20,10=exact",
            Steps({0: Highway(tol=1e-3, max_k=20), 10: Exact()}),
        ),
        ("finish:5:highway:k=2", Finish(Constant(Highway(k=2)), 5)),
        ("adaptive:target=0.9,every=10", Adaptive(target_cosine=0.9, probe_every=10)),
    ],
)
def test_parse_the_documented_forms(text: str, expected: Schedule):
    assert schedule_from_string(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("linear:0,4", "K_START,K_END,STEPS"),
        ("linear:0,4,0", "steps must be an int >= 1"),
        ("steps:5=exact", "from step 0"),
        ("steps:0=exact,0=highway:k=1", "given twice"),
        ("steps:zero=exact", "STEP=METHOD"),
        ("adaptive:target=1.5", "target_cosine must be in"),
        ("adaptive:k_min=4,k_max=2", "k_max"),
        ("adaptive:speed=3", "not understood"),
        ("adaptive:target=0.99,every=10,target=0.5", "'target' given twice"),
        ("adaptive:target=0.99,target_cosine=0.5", "'target/target_cosine' given twice"),
        ("adaptive:every=3,probe_every=3", "'every/probe_every' given twice"),
        ("finish:3", "N:<schedule>"),
        ("finish:3:adaptive:every=3", "stateless"),
        ("cosine:0,4", "unknown method"),
        ("", "empty"),
    ],
)
def test_bad_text_says_what_to_write(text: str, fragment: str):
    with pytest.raises((ValueError, TypeError)) as info:
        schedule_from_string(text)
    assert fragment in str(info.value)
    if isinstance(info.value, ValueError) and text:
        assert "write a k schedule as one of" in str(info.value)


def test_schedules_are_frozen():
    s = Linear(0, 4, 10)
    with pytest.raises(AttributeError):
        s.k_end = 5  # type: ignore[misc]


def test_method_to_string_round_trips_through_method_from_string():
    from highwaybp import method_from_string

    for m in (Exact(), Highway(k=7), FixedPoint(k=0), Highway(tol=0.5, max_k=3, fallback="last")):
        assert method_from_string(method_to_string(m)) == m


def test_from_string_on_a_subclass_checks_the_kind():
    assert Linear.from_string("linear:1,2,3") == Linear(1, 2, 3)
    with pytest.raises(ValueError, match="not a Linear"):
        Linear.from_string("exact")
