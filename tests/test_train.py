"""Trainer: losses on hand-made tensors, the stage freezing, loss going down in every stage,
and a resumed run reaching exactly the state of an uninterrupted one."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from virst.data.render import Shape, render
from virst.errors import ConfigError
from virst.model import VirstModel
from virst.train import losses as L
from virst.train.stages import STAGES, parameter_groups, set_trainable
from virst.train.step import (
    Sample,
    answer_targets,
    corrective_clicks,
    forward_losses,
    keyframes,
)
from virst.train.trainer import TrainConfig, Trainer


def test_bce_dice_iou_token_occlusion_values():
    zeros = torch.zeros(2, 4, 4)
    target = torch.zeros(2, 4, 4)
    target[:, :2] = 1
    assert torch.allclose(L.sigmoid_bce(zeros, target), torch.full((2,), math.log(2)))
    x = torch.tensor([[2.0]])
    assert torch.allclose(L.sigmoid_bce(x[None], torch.ones(1, 1, 1)),
                          torch.tensor([math.log(1 + math.exp(-2))]))
    perfect = (target * 2 - 1) * 50
    assert torch.allclose(L.dice(perfect, target), torch.zeros(2), atol=1e-6)
    # all background: dice = 1 - (0 + 1) / (0 + 8 + 1)
    assert torch.allclose(L.dice(-50 * torch.ones(2, 4, 4), target), torch.full((2,), 8 / 9))
    half = torch.full((4, 4), -1.0)
    half[0] = 1  # 4 px predicted, target 8 px, overlap 4 -> IoU 0.5
    assert L.mask_iou(half, target[0]).item() == pytest.approx(0.5)
    assert L.mask_iou(-torch.ones(4, 4), torch.zeros(4, 4)).item() == 1.0
    assert L.token_ce(torch.zeros(3, 10), torch.tensor([1, L.IGNORE, 4])).item() == (
        pytest.approx(math.log(10)))
    assert L.occlusion(torch.zeros(1), torch.ones(1)).item() == pytest.approx(math.log(2))
    release = ("bce", "dice", "token", "occlusion", "iou")
    parts = {k: torch.tensor(1.0) for k in release}
    assert L.total(parts).item() == pytest.approx(3.1)  # the paper's weights
    assert L.total({**parts, "expression": torch.tensor(1.0)}).item() == pytest.approx(4.1)
    assert L.total({**parts, "grounding": torch.tensor(1.0)}).item() == pytest.approx(4.1)
    logits = torch.tensor([0.0, 5.0, 5.0, 0.0])  # the expression's words are 1 and 2
    low = L.expression_words(logits, [1, 2]).item()
    assert low < L.expression_words(logits, [0, 3]).item()
    assert low == pytest.approx(-torch.log_softmax(logits, 0)[1].item())


def test_grounding_rewards_attention_on_the_target_cells_of_the_query_frame():
    """2 frames, grid 2 (4 cells), 1 head, 1 query token: the target sits in cell 3 of
    frame 0 and cell 0 of frame 1; frames without it are not scored."""
    target = torch.zeros(2, 8, 8)
    target[0, 5:, 5:] = 1
    target[1, :2, :2] = 1

    def attention(cells_per_frame):  # one key per (query frame, chosen cell)
        a = torch.zeros(1, 1, 2, 8)
        for t, cell in enumerate(cells_per_frame):
            a[0, 0, t, cell] = 1.0
        return a

    right = L.grounding(attention([3, 4 + 0]), target, grid=2).item()
    assert right == pytest.approx(0.0, abs=1e-6)
    other_frame = L.grounding(attention([4 + 3, 0]), target, grid=2).item()  # frame 1's cell
    assert other_frame == pytest.approx(-math.log(1e-6), rel=1e-3)
    uniform = L.grounding(torch.full((1, 1, 2, 8), 1 / 8), target, grid=2).item()
    assert uniform == pytest.approx(math.log(8))
    absent = target.clone()
    absent[1] = 0
    assert L.grounding(torch.full((1, 1, 2, 8), 1 / 8), absent, grid=2).item() == (
        pytest.approx(math.log(8)))  # frame 1 dropped, frame 0 unchanged
    assert L.grounding(torch.full((1, 1, 2, 8), 1 / 8), target * 0, grid=2).item() == 0


def test_frame_losses_train_the_chosen_candidate_and_skip_absent_frames():
    """The release's rule: the candidate with the highest predicted IoU (what inference
    outputs) is trained, even when another candidate would fit better."""
    target = torch.zeros(8, 8)
    target[2:6, 2:6] = 1
    good = (target * 2 - 1) * 10
    candidates = torch.stack([-good, good, torch.zeros(8, 8)]).requires_grad_()
    ious = torch.tensor([0.0, 0.3, 0.5], requires_grad=True)  # predicts the empty-ish one
    fl = L.frame_losses(candidates, ious, torch.tensor([3.0]), target, size=8)
    assert fl.bce.item() == pytest.approx(math.log(2))  # candidate 2: logits 0
    assert fl.dice.item() == pytest.approx(1 - (2 * 8 + 1) / (32 + 16 + 1))
    assert fl.iou.item() == pytest.approx(0.5)  # its true IoU is 0 (nothing > 0)
    (fl.bce + fl.iou).backward()
    assert candidates.grad[:2].abs().sum() == 0 and candidates.grad[2].abs().sum() > 0
    assert ious.grad.tolist() == [0.0, 0.0, 1.0]
    absent = L.frame_losses(candidates, ious, torch.tensor([3.0]), torch.zeros(8, 8), size=8)
    assert absent.bce.item() == absent.dice.item() == absent.iou.item() == 0
    assert absent.occlusion.item() == pytest.approx(math.log(1 + math.exp(3)))


def test_keyframes_and_answer_targets():
    assert keyframes(20, [0, 10]) == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15]
    assert keyframes(6, [5]) == [3, 4, 5]
    model = VirstModel.from_preset("tiny")
    from virst.prompt import build_prompt

    p = build_prompt(model.tokenizer, "the red circle")
    seg = model.tokenizer.token_to_id("[SEG]")
    pos, labels = answer_targets(p, 32, seg)
    assert seg not in labels and len(labels) == len(p.after) - p.answer_start - 10
    assert pos[0] == len(p.before) + 32 + p.answer_start - 1  # predicts the answer's 1st token


def test_stage_freezing_follows_the_paper():
    model = VirstModel.from_preset("tiny")
    groups = {g: {n for n, _ in ps} for g, ps in parameter_groups(model).items()}
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert all(n.startswith(("seg_prompter.", "initial_seg_fusion.")) for n in groups["stf"])
    assert "sam2.sam_mask_decoder.iou_token.weight" in groups["sam_heads"]
    assert "sam2.memory_attention.layers.0.linear1.weight" in groups["sam_heads"]
    assert "sam2.maskmem_tpos_enc" in groups["sam_heads"]
    expected = {1: {"stf", "llm"}, 2: {"stf", "llm", "sam_heads"},
                3: {"stf", "llm", "sam_heads", "sam_encoder", "vision"}}
    for stage, want in expected.items():
        trainable = set(set_trainable(model, STAGES[stage], lora=False))
        assert trainable == set().union(*(groups[g] for g in want)), stage
        assert not trainable & groups["sam_encoder"] or stage == 3
    from virst.train.stages import apply_lora

    apply_lora(model, r=4)
    names = set_trainable(model, STAGES[1], lora=True)
    llm = [n for n in names if n.startswith("vlm.")]
    assert llm and all("lora_" in n for n in llm)  # base LLM and lm_head frozen
    assert not any(n.startswith("sam2.") for n in names)


def toy_sample(index: int) -> Sample:
    t = 8
    rng = np.random.default_rng(index)
    path = np.stack([np.linspace(10, 60, t), np.full(t, 30.0)], 1)
    shapes = [Shape("circle", "red", 9, path, 1),
              Shape("square", "blue", 10, np.tile([[40.0, 20.0]], (t, 1)), 0)]
    frames, masks = render(shapes, 48, 72, t, rng)
    return Sample(frames, ["the red circle", "the blue square"], [masks[0], masks[1]], 0)


def _toy_trainer(tmp_path, **kw):
    model = VirstModel.from_preset("tiny", seed=0)
    cfg = TrainConfig(out=str(tmp_path), eval_videos=0, check_videos=0, warmup=0.0,
                      click_videos=1, **kw)
    return Trainer(model, cfg, sample_fn=lambda i: toy_sample(0))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_loss_decreases_in_every_stage(tmp_path, stage):
    trainer = _toy_trainer(tmp_path, stages=[stage], steps={stage: 6}, lr={stage: 2e-3},
                           save_every=100)
    trainer.run()
    curve = trainer.history[0]["loss_curve"]
    assert len(curve) == 6
    assert np.mean(curve[-2:]) < np.mean(curve[:2]), (stage, curve)


def test_resume_after_interrupt_reaches_the_same_parameters(tmp_path):
    kw = dict(stages=[1, 3], steps={1: 2, 3: 2}, lr={1: 1e-3, 3: 1e-3}, lora=True,
              save_every=1)
    straight = _toy_trainer(tmp_path / "a", **kw)
    straight.run()
    interrupted = _toy_trainer(tmp_path / "b", **kw)
    interrupted.run(stop_after=3)  # stops inside stage 3, LoRA adapters active
    assert interrupted.position["stage_index"] == 1 and interrupted.position["step"] == 1
    resumed = _toy_trainer(tmp_path / "b", **kw)
    resumed.run()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and not any("lora_" in k for k in a)  # merged when written
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_" in k for k in resumed.model.state_dict())  # adapters while training
    # the history of the interrupted stage covers its steps before the interruption too
    assert [len(h["loss_curve"]) for h in resumed.history] == [2, 2]
    assert resumed.history[1]["loss_curve"] == straight.history[1]["loss_curve"]


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    """The optimizer state may be partial on load (unused parameters have none); the
    weights may not: a checkpoint that lacks some of them names the problem."""
    kw = dict(stages=[1], steps={1: 2}, lr={1: 1e-3}, save_every=1)
    _toy_trainer(tmp_path, **kw).run(stop_after=1)
    other = _toy_trainer(tmp_path, **kw)
    other.model.sam2.extra = torch.nn.Linear(2, 2)  # weights the checkpoint does not hold
    with pytest.raises(ConfigError, match="does not hold 2 of this model's weights"):
        other.run()


def test_stage_3_of_an_every_frame_anchor_model_trains_every_frame_from_its_prompt(tmp_path):
    """With `frames_per_anchor` 1 no segmentation frame is reached by propagation, so the
    trainer's stage 3 runs the 'anchors' forward (the config reaches `Stage.mode_for`)."""
    modes = []
    for fpa in (4, 1):
        trainer = _toy_trainer(tmp_path / str(fpa), stages=[3], steps={3: 2}, lr={3: 1e-4},
                               save_every=100, points_every=0)
        trainer.model.config = dataclasses.replace(trainer.model.config, frames_per_anchor=fpa)
        trainer.model.forward = lambda sample, mode, *a, f=trainer.model.forward: (
            modes.append(mode) or f(sample, mode, *a))
        trainer.run()
    assert modes == ["propagate", "propagate", "anchors", "anchors"]


def test_stage_schedule_and_click_prompts():
    """Stages training SAM2's heads keep every n-th sample on clicks; corrective clicks land
    in the larger error region with the right label; a click step trains SAM2's heads and
    nothing of the STF."""
    assert STAGES[0].mode_for(0) == "clicks"
    assert [STAGES[3].mode_for(i, 3) for i in range(4)] == [
        "clicks", "propagate", "propagate", "clicks"]
    assert [STAGES[3].mode_for(i, 3, frames_per_anchor=1) for i in range(3)] == [
        "clicks", "anchors", "anchors"]  # every segmentation frame an anchor: nothing between
    assert STAGES[1].mode_for(0, 3) == "anchors"  # SAM2 frozen: no click samples
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    pred = torch.zeros(2, 8, 8, dtype=torch.bool)
    pred[0, 2:4, 2:6] = True  # misses 8 pixels: a positive click on one of them
    pred[1] = target[1]
    pred[1, 0, :] = True  # 8 false pixels and nothing missed: a negative click there
    points, labels = corrective_clicks(pred, target.float(), np.random.default_rng(0))
    (x0, y0), (x1, y1) = points[0][0], points[1][0]
    assert labels == [[1], [0]]
    assert target[0, int(y0), int(x0)] and not pred[0, int(y0), int(x0)]
    assert y1 == 0 and not target[1, int(y1), int(x1)]
    model = VirstModel.from_preset("tiny", seed=0)
    sample = toy_sample(0)
    parts = forward_losses(model.train(), sample, "clicks")
    assert parts["dice"].item() > 0 and parts["token"].item() == 0
    (parts["bce"] + parts["dice"]).backward()
    assert model.sam2.sam_prompt_encoder.point_embeddings[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.seg_prompter.parameters())
    assert all(p.grad is None for p in model.vlm.parameters())
    parts = forward_losses(model.train(), sample, "click_propagate")
    assert parts["dice"].item() > 0


def _toy_objects(index: int) -> Sample:
    """Four objects (one moving) on a small clip: where clicks can land."""
    t = 6
    path = np.tile([[14.0, 14.0]], (t, 1)) + np.arange(t)[:, None] * [2.0, 0.0]
    shapes = [Shape("circle", "red", 10, path, 1),
              Shape("square", "blue", 10, np.tile([[56.0, 14.0]], (t, 1)), 1),
              Shape("triangle", "green", 10, np.tile([[36.0, 36.0]], (t, 1)), 1)]
    frames, masks = render(shapes, 48, 72, t, np.random.default_rng(index))
    return Sample(frames, ["the red circle"], [masks[0]], index, masks)


def test_prompt_phase_lowers_click_agreement_and_the_collapse_detector_fires(tmp_path):
    """A short prompt-following run on a handful of frames: masks of clicks on different
    objects stop agreeing (1.0 -> well below the limit), and the stage ends normally; the
    same check on a decoder that ignores its clicks (two steps in) stops training with a
    message instead of going on."""
    import torch.nn.functional as F

    from virst.errors import TrainingError
    from virst.eval.prompting import click_following

    sample = _toy_objects(0)
    masks = F.interpolate(torch.from_numpy(sample.objects).float(), size=(256, 256),
                          mode="nearest-exact") > 0.5
    views = [(sample.frames[:3], masks[:, :3].permute(1, 0, 2, 3).numpy())]

    def trainer(out, steps):
        model = VirstModel.from_preset("tiny", seed=0)
        cfg = TrainConfig(out=str(out), stages=[0], steps={0: steps}, lr={0: 2e-3},
                          eval_videos=0, check_every=0, check_videos=1, warmup=0.0,
                          click_videos=2, decoder_first=steps, prompt_init=True,
                          save_every=1000)
        t = Trainer(model, cfg, sample_fn=_toy_objects)
        t._views = views  # the held-out check on these frames instead of shapes valid
        return t

    before = click_following(VirstModel.from_preset("tiny", seed=0), views)
    assert before["click_agreement"] > 0.9
    with pytest.raises(TrainingError, match="ignores its prompt"):
        trainer(tmp_path / "collapsed", steps=2).run()
    good = trainer(tmp_path / "follows", steps=200)
    good.run()
    check = good.history[0]["prompt_following"][-1]
    assert check["click_agreement"] < 0.8 and check["click_iou"] > before["click_iou"] + 0.2
    assert 0 <= check["track_agreement"] <= 1 and check["tracked_frames"] > 0  # shapes clip


def test_stage_losses_average_over_the_steps_that_have_them():
    """Click steps of stages 2-3 carry no expression losses; a stage whose last 20 steps
    begin with an expression step must still be recorded (it raised KeyError)."""
    from virst.train.trainer import _mean

    rows = [{"loss": 1.0, "expression": 2.0}, {"loss": 3.0}, {"loss": 5.0, "expression": 4.0}]
    assert _mean(rows) == {"loss": 3.0, "expression": 3.0}
    assert _mean([]) == {}


def test_scratch_losses_train_stf_to_look_at_the_target(tmp_path):
    """Stage 1 with the expression and grounding losses: both are logged on every step and
    the grounding loss (STF attention on the target's cells) falls on the toy sample."""
    trainer = _toy_trainer(tmp_path, stages=[1], steps={1: 20}, lr={1: 2e-3}, save_every=100,
                           scratch_losses=True)
    trainer.run(stop_after=8)  # an interrupted stage keeps its per-step losses
    assert len(trainer.losses) == 8
    grounding = [r["grounding"] for r in trainer.losses]
    assert all("expression" in r for r in trainer.losses)
    assert np.mean(grounding[-2:]) < np.mean(grounding[:2]), grounding


def test_ground_mode_computes_the_full_stage_language_and_grounding_losses():
    """"ground" mode (no mask decoder) gives the token, expression and grounding losses
    that the full stage-1 forward gives on the same sample (dropout off), and no mask loss."""
    model = VirstModel.from_preset("tiny", seed=0).eval()
    sample = toy_sample(0)
    full = forward_losses(model, sample, "anchors", scratch_losses=True)
    ground = forward_losses(model, sample, "ground", scratch_losses=True)
    assert set(ground) == {"token", "expression", "grounding"}
    for k in ground:
        assert ground[k].item() == pytest.approx(full[k].item(), rel=1e-5, abs=1e-6), k


def test_ground_mode_keeps_each_videos_features_and_trains_stf_and_llm_only(tmp_path):
    """grounding_only: every video of the pool is built and encoded once however many
    times it is drawn; STF and the LLM train (the grounding loss falls), SAM2 does not."""
    calls = []

    def sample_fn(i):
        calls.append(i)
        return toy_sample(0)

    model = VirstModel.from_preset("tiny", seed=0)
    cfg = TrainConfig(out=str(tmp_path), stages=[1], steps={1: 8}, lr={1: 2e-3},
                      eval_videos=0, check_videos=0, warmup=0.0, save_every=100,
                      accumulate=2, train_videos=2, first_video=5, scratch_losses=True,
                      grounding_only=True)
    sam2 = {k: v.clone() for k, v in model.sam2.state_dict().items()}
    stf = {k: v.clone() for k, v in model.seg_prompter.state_dict().items()}
    trainer = Trainer(model, cfg, sample_fn=sample_fn)
    trainer.run()
    assert trainer.history[0]["name"] == "align (grounding only)"
    assert sorted(calls) == [5, 6]  # 16 draws, 2 videos built: the pool from first_video
    # the pool's memory is the features: no kept sample holds its video's frames alive
    kept = trainer._sample(5, "ground")  # (the pool is freed at the stage's end)
    assert kept.features is not None and kept.frames.size == 0 and kept.frames.base is None
    assert "dice" not in trainer.history[0]["final_losses"]
    assert trainer.history[0]["loss_curve"][-1] < trainer.history[0]["loss_curve"][0]
    assert all(torch.equal(v, model.sam2.state_dict()[k]) for k, v in sam2.items())
    assert any(not torch.equal(v, model.seg_prompter.state_dict()[k]) for k, v in stf.items())


def test_ground_mode_refuses_what_it_cannot_train():
    with pytest.raises(ConfigError, match="scratch losses"):
        TrainConfig(out="x", grounding_only=True, train_videos=10)
    with pytest.raises(ConfigError, match="--train-videos"):
        TrainConfig(out="x", grounding_only=True, scratch_losses=True)
