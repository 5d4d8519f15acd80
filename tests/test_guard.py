"""The held-out guard as a policy (edgezo.guard): decisions from losses alone, no model."""

from __future__ import annotations

import math

import pytest

from edgezo.guard import GuardSettings, HeldoutGuard


def kinds(guard: HeldoutGuard, losses: list[float], every: int = 10) -> list[str]:
    return [guard.observe(every * (i + 1), x).kind for i, x in enumerate(losses)]


def test_progress_then_a_plateau_waits_for_its_patience():
    g = HeldoutGuard(GuardSettings(eval_every=10, plateau_patience=2), before=5.0)
    # improves twice, then flat: the first flat evaluation is patience, the second decays
    assert kinds(g, [4.0, 3.0, 3.0, 3.0, 3.0, 3.0]) == [
        "progress",
        "progress",
        "steady",
        "decay",
        "steady",
        "decay",
    ]
    assert g.lr_scale == 0.25 and g.decays == 2 and g.best == 3.0 and g.best_step == 20


def test_a_plateau_decays_a_bounded_number_of_times_and_never_below_its_floor():
    # the case of a fast classifier run: loss frozen after an early improvement, hundreds of
    # evaluations; the learning rate must not be halved to nothing (it once reached 2.6e-87)
    s = GuardSettings(eval_every=50, plateau_patience=2, plateau_max_decays=4)
    g = HeldoutGuard(s, before=1.609)
    seen = kinds(g, [0.6140] + [0.6140] * 400, every=50)
    assert seen.count("decay") == 4 and g.lr_scale == 0.5**4
    floor = HeldoutGuard(GuardSettings(plateau_min_lr_ratio=0.3, plateau_patience=1), 2.0)
    kinds(floor, [1.0] + [1.0] * 50)
    assert floor.lr_scale == 0.5 and floor.decays == 1  # 0.25 would be below the floor


def test_a_still_falling_loss_is_no_plateau():
    g = HeldoutGuard(GuardSettings(plateau_patience=1), before=5.0)
    # below the best by less than 0.1% (no progress) but lower than the previous: recovering
    assert kinds(g, [4.0, 4.1, 4.0999, 4.0998]) == ["progress", "decay", "steady", "steady"]


def test_divergence_rolls_back_halves_the_rate_and_gives_up_after_max_rollbacks():
    g = HeldoutGuard(GuardSettings(divergence_tolerance=0.1, max_rollbacks=2), before=5.0)
    d = g.observe(10, 4.0)
    assert d.kind == "progress"
    d = g.observe(20, 4.5)  # 12.5% above the best
    assert (d.kind, d.to_step, d.lr_scale) == ("rollback", 10, 0.5)
    assert g.observe(30, math.nan).kind == "rollback"  # a non-finite loss is divergence too
    d = g.observe(40, 100.0)
    assert (d.kind, d.to_step, g.rollbacks, d.lr_scale) == ("give_up", 10, 3, 0.125)
    assert "above 1.1 x its best 4.0000 (step 10)" in d.message


def test_tolerance_zero_turns_the_divergence_check_off():
    g = HeldoutGuard(GuardSettings(divergence_tolerance=0.0), before=1.0)
    assert g.observe(10, 1e9).kind != "rollback"


def test_a_run_that_never_improves_gets_one_stall_warning_per_stall():
    g = HeldoutGuard(GuardSettings(eval_every=5), before=2.0)
    seen = kinds(g, [2.0] * 8, every=5)
    assert "decay" not in seen  # no decay before any progress: a larger lr is needed instead
    assert seen.count("stall") == 1 and seen.index("stall") == 1  # after 2 x eval_every steps
    assert (
        "no held-out progress in 10 steps"
        in HeldoutGuard(GuardSettings(eval_every=5), 2.0).observe(10, 2.0).message
    )


def test_plateau_factor_one_turns_decays_off():
    g = HeldoutGuard(GuardSettings(plateau_factor=1.0, plateau_patience=1), before=5.0)
    assert "decay" not in kinds(g, [4.0] + [4.0] * 10)
    assert g.lr_scale == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_from_ledger_rebuilds_the_state_that_observing_reached(seed):
    import random

    rng = random.Random(seed)
    s = GuardSettings(eval_every=3, divergence_tolerance=0.05, plateau_patience=2)
    live = HeldoutGuard(s, before=3.0)
    records = []
    loss = 3.0
    for step in range(60):
        rec = {"step": step, "status": "ok"}
        if (step + 1) % 3 == 0:
            loss = max(0.5, loss + rng.uniform(-0.12, 0.1))
            rec["heldout"] = loss
            d = live.observe(step + 1, loss)
            records.append(rec)
            if d.kind in ("rollback", "give_up"):
                records.append({"step": step + 1, "status": "rollback", "to": d.to_step})
            continue
        records.append(rec)
    again = HeldoutGuard.from_ledger(s, 3.0, records)
    assert vars(again) == vars(live)
