"""DistributedDataParallel on CPU (gloo): 2 processes x batch B == 1 process x batch 2B.

BatchNorm is the one thing that legitimately differs (per-rank batch statistics over B images vs
2B), so both runs use ``--freeze-bn`` (running statistics); everything else — the data each step
sees (ranks read disjoint halves of the same shuffled order), the averaged gradients, the learning
rate scaled by world size x batch / 32 — must agree. Evaluation runs distributed too, over an odd
number of images, so the sampler pads one rank: the metrics must equal the single-process ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TWO_CLASSES, run_ssd300

pytestmark = pytest.mark.slow  # two torchrun ranks against one



def test_two_ranks_match_one_rank_with_double_batch(synthetic_dataset, tmp_path):
    data = synthetic_dataset(num_train=4, num_val=3, seed=1, **TWO_CLASSES)
    common = ["train", "--data", str(data), "--backbone", "resnet18", "--epochs", "1", "--seed", "3",
              "--num-workers", "0", "--no-amp", "--freeze-bn", "--warmup", "0", "--lr", "0.1", "--device", "cpu",
              "--evaluation", "0", "--ebs", "2", "--no-progress", "--log-interval", "1"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_ssd300([*common, "--bs", "1", "--save", str(ddp), "--json-summary", str(ddp / "summary.json")], ranks=2)
    run_ssd300([*common, "--bs", "2", "--save", str(single), "--json-summary", str(single / "summary.json")])

    a = torch.load(ddp / "epoch_0.pt", weights_only=True)
    b = torch.load(single / "epoch_0.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 2
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=1e-4, atol=1e-5), key
    momentum_a, momentum_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert len(momentum_a) == len(momentum_b) > 0
    for index, state in momentum_a.items():  # the averaged gradients agree, and they are not zero
        a_buf, b_buf = state["momentum_buffer"], momentum_b[index]["momentum_buffer"]
        # gradients summed in another order (all-reduce vs one batch): compare per tensor, relatively
        assert float((a_buf - b_buf).norm()) <= 1e-3 * float(b_buf.norm()) + 1e-8, index
    assert any(float(s["momentum_buffer"].abs().max()) > 0 for s in momentum_a.values())

    summary_ddp = json.loads((ddp / "summary.json").read_text())
    summary_single = json.loads((single / "summary.json").read_text())
    assert summary_ddp["world_size"] == 2
    assert abs(summary_ddp["AP50"] - summary_single["AP50"]) < 1e-3
    assert abs(summary_ddp["AP"] - summary_single["AP"]) < 1e-3
    results_ddp = json.loads((ddp / "results.json").read_text())
    results_single = json.loads((single / "results.json").read_text())
    assert {r["image_id"] for r in results_ddp} == {r["image_id"] for r in results_single}
    assert abs(len(results_ddp) - len(results_single)) <= 2  # padding duplicate not counted twice
    # only rank 0 writes: one log line per step, not two
    assert len((ddp / "log.jsonl").read_text().splitlines()) == 2 + 1  # 2 steps + 1 evaluation
