"""The command line: readable errors (exit 2), the registry, dry runs, judge scoring."""

import re
from pathlib import Path

from typer.testing import CliRunner

from tbr_ray.cli import app

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
runner = CliRunner()


def test_models_lists_paper_and_tiny_models():
    out = runner.invoke(app, ["models"])
    assert out.exit_code == 0
    assert "llama-2-70b" in out.output and "tiny-falcon" in out.output
    assert "merge" in out.output  # falcon: no vLLM LoRA, adapters are merged
    assert re.search(r"FalconForCausalLM +merge +query_key_value,dense,", out.output)  # its row


def test_config_error_is_one_readable_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid:\n  models: [tiny-llama]\ntrain:\n  lora_rnak: 4\n")
    out = runner.invoke(app, ["validate", str(bad)])
    assert out.exit_code == 2 and "train.lora_rnak: unknown key" in out.output
    assert "Traceback" not in out.output


def test_dry_run_prints_cells_and_gpu_hours():
    """Without a cluster size the plan still sizes every cell and engine (the before-stop hook
    runs this); with --gpus it adds GPU-hours and the makespan. --config-only skips this
    machine's files and secrets (the paper's user benchmark files and key are the cluster's)."""
    paper = ["ablate", "--config", str(REPO / "jobs/paper.yaml"), "--dry-run", "--config-only"]
    out = runner.invoke(app, paper)
    assert out.exit_code == 0 and "45 cells" in out.output and "Fix: pass --gpus" in out.output
    out = runner.invoke(app, [*paper, "--gpus", "8", "--gpu-memory", "80"])
    assert out.exit_code == 0 and "REFUSED" not in out.output
    assert "GPU-hours (write" in out.output and "makespan" in out.output
    assert "on 8 H100 GPUs" in out.output and "bill: " in out.output and "= $" in out.output
    # --gpu-type: the type's FLOPs, price and (without --gpu-memory) its memory.
    h200 = runner.invoke(app, [*paper, "--gpus", "8", "--gpu-type", "H200"])
    assert h200.exit_code == 0 and "on 8 H200 GPUs" in h200.output and "(H200, " in h200.output
    # ... and the power statement per Table 3 column (tests/test_power.py checks its figures).
    assert "power: internal and external against `none`" in out.output
    assert re.search(r"XSTest-S +250 x 1 +0\.74 .*\+0\.0\d\d / -0\.0\d\d", out.output)


def test_paper_dry_run_plans_here_and_lists_what_the_cluster_must_have(tmp_path):
    """The before-stop hook's command: a GPU config planned from a machine that lacks the
    cluster's files and secrets still plans (exit 0); those lines are printed as the preflight
    the cluster must pass, naming the missing benchmark file."""
    paper = ["ablate", "--config", str(REPO / "jobs/paper.yaml"), "--dry-run"]
    out = runner.invoke(app, [*paper, "--gpus", "8", "--output", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert "makespan" in out.output and "preflight on this machine" in out.output
    assert "malicious_instruct" in out.output


def test_dry_run_on_one_gpu_refuses_the_large_models_by_name():
    out = runner.invoke(
        app,
        ["ablate", "--config", str(REPO / "jobs/paper.yaml"), "--dry-run", "--config-only"]
        + ["--gpus", "1"],
    )
    assert out.exit_code == 2 and "REFUSED" in out.output
    named = "falcon-40b, llama-2-70b, llama-3-70b, llama-3.1-70b"
    assert f"models that cannot run here: {named}\n" in out.output


def test_dry_run_over_a_damaged_run_json_plans_without_measurements(tmp_path):
    """`--output` of a run whose run.json a power loss emptied: the plan is made from the
    budgets (which config the folder holds is unknown), not a traceback."""
    (tmp_path / "run.json").write_text("")
    tiny = ["ablate", "--config", str(REPO / "jobs/tiny.yaml"), "--dry-run", "--config-only"]
    out = runner.invoke(app, [*tiny, "--output", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert out.output == runner.invoke(app, tiny).output


def test_unknown_model_is_named_with_the_fix():
    out = runner.invoke(
        app,
        [
            "ablate",
            "--config",
            str(REPO / "jobs/tiny.yaml"),
            "--dry-run",
            "--set",
            "grid.models=[llama-9b]",
        ],
    )
    assert out.exit_code == 2 and "unknown model 'llama-9b'" in out.output
    assert "tbr-ray models" in out.output


def test_judge_score_prints_agreement_and_confusion():
    out = runner.invoke(
        app,
        ["judge-score", "--judge", "xstest-prefix", "--labels", str(FIXTURES / "judge_labels.csv")],
    )
    assert out.exit_code == 0, out.output
    assert "0.9" in out.output and "full_refusal" in out.output
    out = runner.invoke(app, ["judge-score", "--judge", "nope", "--labels", "x.csv"])
    assert out.exit_code == 2 and "unknown judge" in out.output
    labels = str(FIXTURES / "judge_labels.csv")
    out = runner.invoke(app, ["judge-score", "--judge", "model", "--labels", labels])
    assert out.exit_code == 2 and "eval.refusal_judge" in out.output
    tiny = str(REPO / "jobs/tiny.yaml")
    out = runner.invoke(
        app, ["judge-score", "--judge", "model", "--labels", labels, "--config", tiny]
    )
    assert out.exit_code == 2 and "eval.refusal_judge set" in out.output


def test_a_gpu_run_that_cannot_be_placed_stops_before_ray(tmp_path):
    """The same refusal as the dry run's, for a real run: exit 2 before Ray or any file."""
    paper = ["--config", str(REPO / "jobs/paper.yaml"), "--set", "cluster.gpus=1"]
    for command in (["ablate", "--config-only"], ["cell", "--model", "llama-2-70b"]):
        out = runner.invoke(app, [*command, *paper, "--output", str(tmp_path / "run")])
        assert out.exit_code == 2 and "problem(s) placing this grid" in out.output, out.output
        assert "llama-3.1-70b: its vLLM engine needs 4 GPUs" in out.output
    assert not (tmp_path / "run").exists()


def test_dry_run_of_a_cpu_grid_plans_on_this_machines_cores():
    import os

    tiny = ["ablate", "--config", str(REPO / "jobs/tiny.yaml"), "--dry-run", "--config-only"]
    out = runner.invoke(app, tiny)
    assert out.exit_code == 0 and "9 cells; 9 trained" in out.output
    assert "makespan" in out.output and f"on {os.cpu_count()} CPU cores" in out.output
