"""Training over real processes (torchrun, gloo on CPU, 2 ranks, tiny preset, LoRA on the
LLM): DDP and FSDP2 reach the parameters of one process with gradient accumulation 2 on
the same samples; a 2-rank sharded checkpoint resumes on 1 rank and on 2 ranks to the
parameters of an uninterrupted run; the merged final folder loads with from_pretrained."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from virst.model import VirstModel

pytestmark = pytest.mark.slow
COMMON = ["--stage", "1,3", "--steps", "2,1", "--accumulate", "2", "--lora", "--eval-videos",
          "0", "--check-videos", "0", "--save-every", "100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out, *extra, ranks: int = 1):
    if ranks == 1:
        cmd = [sys.executable, "-m", "virst.cli", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
               "virst.train"]
    res = subprocess.run([*cmd, *COMMON, "-o", str(out), *extra], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-6, atol=1e-7), k


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(out)
    return out


def test_ddp_and_fsdp2_equal_one_process_with_accumulation(single, tmp_path):
    reference = weights(single)
    start = VirstModel.from_preset("tiny", seed=0).state_dict()
    moved = [k for k in reference if not torch.equal(reference[k], start[k])]
    assert any(k.startswith("vlm.llm.layers.") for k in moved)  # LoRA merged into the LLM
    assert any(k.startswith("seg_prompter.") for k in moved)
    assert not any("lora" in k for k in reference)
    for strategy in ("ddp", "fsdp2"):
        res = train(tmp_path / strategy, "--strategy", strategy, ranks=2)
        assert f"2 process(es), {strategy}" in res.stdout
        assert_same(reference, weights(tmp_path / strategy))
    model = VirstModel.from_pretrained(tmp_path / "fsdp2" / "model")
    assert model.sam2.sam_mask_decoder.transformer.num_heads == 2


def test_a_two_rank_checkpoint_resumes_on_one_and_on_two_ranks(single, tmp_path):
    stopped = tmp_path / "one"
    train(stopped, "--strategy", "fsdp2", "--stop-after", "2", ranks=2)  # interrupted
    shards = sorted(p.name for p in (stopped / "checkpoint" / "shards").glob("*.distcp"))
    assert len(shards) == 2 and not (stopped / "model").exists()
    shutil.copytree(stopped, tmp_path / "two")
    train(stopped)  # resumed by one process
    train(tmp_path / "two", "--strategy", "ddp", ranks=2)  # resumed by two, another strategy
    reference = weights(single)
    assert_same(reference, weights(stopped))
    assert_same(reference, weights(tmp_path / "two"))
