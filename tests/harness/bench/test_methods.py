"""Run-time estimates of a suite from measured per-iteration costs (the arithmetic, not the timing)."""

import pytest

from harness.bench.methods import estimate_suite_seconds, overhead_table


def test_estimate_adds_iterations_to_the_budget_and_one_evaluation_per_point():
    rows = [
        {"run": "diffusion_nft", "fwd_equiv_per_iteration": 3520, "total_s": 5.0, "eval_s": 4.0},
        {"run": "flow_grpo_cfg4.5", "fwd_equiv_per_iteration": 3700, "total_s": 7.0, "eval_s": 8.0},
        {"run": "flow_grpo_nocfg", "fwd_equiv_per_iteration": 2000, "total_s": 3.0, "eval_s": 4.0},
    ]
    total, per_cell = estimate_suite_seconds(rows, "shapes_quick")  # 48,000 fwd_equiv, 4 eval points, 2 seeds
    assert per_cell == {"diffusion_nft": 14 * 5.0 + 4 * 4.0, "flow_grpo_cfg4.5": 13 * 7.0 + 4 * 8.0,
                        "flow_grpo_nocfg": 24 * 3.0 + 4 * 4.0}  # fmt: skip
    assert total == pytest.approx(2 * (86 + 123 + 88) + 4.0 + 8.0)  # + the untrained model, once per eval CFG


def test_overhead_table_shares_add_up():
    timing = {"wall_seconds": 100.0, "method_seconds": {"sampling": 20.0, "reward": 5.0, "training": 50.0},
              "eval_seconds": 20.0, "harness_seconds": 5.0, "torch_threads": 2}  # fmt: skip
    table = overhead_table(timing, "s", "cmd")
    assert "| harness overhead | 5.0 | 5.0% |" in table and "| method training | 50.0 | 50.0% |" in table
