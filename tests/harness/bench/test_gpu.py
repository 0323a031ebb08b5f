"""``diffrl bench gpu``: the whole script in ``--tiny`` mode on the CPU (the structure of what it writes, not
the speed), the peak table, and the cost arithmetic on a synthetic report."""

from __future__ import annotations

import json

import pytest
import torch

from harness.bench.gpu import (
    SD35_GENEVAL_BUDGET,
    SD35_GENEVAL_ITERATION,
    main,
    markdown,
    peak_tflops,
    sd35_cell_gpu_hours,
    shapes_cell,
)


def test_tiny_run_writes_every_section_as_json_and_markdown(tmp_path):
    report = main(["--tiny", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "gpu_bench_tiny.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert (tmp_path / "gpu_bench_tiny.md").read_text() == markdown(written)  # the Markdown is the JSON's
    assert (written["mode"], written["device"], written["peak_bf16_tflops"]) == ("tiny", "cpu", None)
    assert written["skipped"] == []
    bare = {(r["micro_batch"], r["compiled"]): r for r in written["bare_loop"]}
    assert set(bare) == {(2, False), (4, False), (4, True)}  # --tiny compiles the largest micro-batch only
    for row in bare.values():
        assert row["tflop_per_s"] > 0 and row["backward_tflop"] > 0
        assert row["fraction_of_peak"] is None and row["peak_memory_gib"] is None  # no peak, no CUDA memory
    options = {r["option"]: r for r in written["options"]}
    assert options["attention _native_cudnn"]["skipped"] == "needs a CUDA device"
    assert all(options[o]["seconds_per_step"] > 0 for o in ("gradient_checkpointing", "bf16 throughout"))
    harness = {(r["method"], r["micro_batch"], r["compiled"]): r for r in written["harness"]}
    assert set(harness) == {(m, b, False) for m in ("diffusion_nft", "flow_grpo") for b in (2, 4)} | {
        ("diffusion_nft", 4, True), ("flow_grpo", 4, True)}  # fmt: skip
    # 4 images × 2 steps; DiffusionNFT trains 1 time per sample with old, θ and ref; FlowGRPO with CFG doubles.
    nft = harness[("diffusion_nft", 2, False)]
    assert nft["forwards"] == {"sampling": 8, "training": 12} and nft["backwards_training"] == 4
    assert harness[("flow_grpo", 4, False)]["train_batch_size"] == 2  # 2 prompts × CFG: the transformer sees 4
    assert all(r["training_tflop_per_s"] > 0 and r["training_over_bare"] > 0 for r in harness.values())
    cell = written["shapes_cell"]
    assert cell["seconds_per_iteration"] > 0 and cell["speedup_over_cpu"] is None  # --tiny: no CPU comparison
    text = (tmp_path / "gpu_bench_tiny.md").read_text()
    for heading in ("## (a) The limit", "## (b, c) The harness", "## (d) The tiny DiT", "## sd35_geneval"):
        assert heading in text
    assert "| micro-batch | compiled | s/step | TFLOP/s | of peak | peak memory GiB | first step s |" in text
    assert "not measured (CPU)" in text


def test_peaks_are_known_for_the_named_cards_only():
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H100 PCIe") is None and peak_tflops("Tesla T4") is None


def harness_row(method: str, micro_batch: int, sampling: float, training: float, compiled: bool = False) -> dict:
    return {"method": method, "micro_batch": micro_batch, "compiled": compiled,
            "fwd_equiv_per_second": {"sampling": sampling, "training": training}}  # fmt: skip


def test_the_cost_of_a_cell_is_recomputed_from_the_rates_of_the_nearest_micro_batch():
    # docs/sd3.md: 63,360 (DiffusionNFT) and 105,984 (FlowGRPO) forward-equivalents per iteration.
    assert [sum(v for k, v in it.items() if k != "micro_batch") for it in SD35_GENEVAL_ITERATION.values()] == [
        63_360, 105_984]  # fmt: skip
    report = {"harness": [
        harness_row("diffusion_nft", 4, 1.0, 1.0), harness_row("diffusion_nft", 8, 100.0, 50.0),
        harness_row("flow_grpo", 8, 1.0, 1.0), harness_row("flow_grpo", 16, 200.0, 100.0),
        harness_row("flow_grpo", 16, 400.0, 200.0, compiled=True),
    ]}  # fmt: skip
    hours = sd35_cell_gpu_hours(report)
    nft = hours["diffusion_nft"]  # micro-batch 9 → 8; 11,520 / 100 + 51,840 / 50 = 1152 s, 1000 iterations
    assert nft["micro_batch_measured"] == 8 and nft["seconds_per_iteration"] == pytest.approx(1152.0)
    assert nft["iterations"] == pytest.approx(1000) and nft["gpu_hours"] == pytest.approx(320.0)
    grpo = hours["flow_grpo"]  # transformer batch 18 → 16; 23,040 / 200 + 82,944 / 100 = 944.64 s
    assert grpo["micro_batch_measured"] == 16 and grpo["seconds_per_iteration"] == pytest.approx(944.64)
    assert grpo["gpu_hours"] == pytest.approx(SD35_GENEVAL_BUDGET / 105_984 * 944.64 / 3600)
    compiled = sd35_cell_gpu_hours(report, compiled=True)
    assert set(compiled) == {"flow_grpo"} and compiled["flow_grpo"]["gpu_hours"] == pytest.approx(grpo["gpu_hours"] / 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_tiny_dit_cell_is_skipped_with_the_reason_where_the_suite_refuses_the_device(tmp_path):
    cell = shapes_cell("cuda", "shapes_full", "diffusion_nft", 1, 0, tmp_path / "none.json")
    assert cell["skipped"].startswith("the suite refuses model.device = 'cuda': suite.model.device")
