"""The shared training machinery: checkpoints are safe and atomic, batches are a pure function of the
step, and a stage killed mid-way resumes to exactly the same weights."""
import json
import os
import pickle
import signal

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from runtime import (CheckpointError, MetricsLog, NonFiniteLoss, load_checkpoint, load_model, model_checkpoint,
                     rng_state, save_checkpoint, set_rng_state)
from tokens import Tokenizer, pack_examples
from train import LMTrainConfig, get_batch, lr_at, supervised_train
import runtime
import train


class Cfg:  # the run-level fields supervised_train reads
    seed, compile, dtype, micro_tokens = 0, False, "auto", 0


def tiny_model(vocab=300, dropout=0.0):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, dropout=dropout))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(str(path))


def test_corrupt_and_missing_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_round_trip_keeps_model_and_rng(tmp_path):
    model, tok = tiny_model(), Tokenizer.gpt2()
    torch.manual_seed(3)
    state = rng_state()
    a = torch.rand(3)
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model_checkpoint(model, tok, rng=state, step=7))
    assert not os.path.exists(path + ".tmp")  # written via a temp file, then renamed
    loaded, tok2, ckpt = load_model(path)
    idx = torch.randint(0, 300, (2, 10))
    assert torch.equal(loaded(idx)[0], model(idx)[0]) and ckpt["step"] == 7 and tok2.vocab_size == tok.vocab_size
    set_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(3), a)


def test_gpu_peak_is_the_longest_name_that_matches():
    assert runtime.cuda_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert runtime.cuda_peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM part's 989
    assert runtime.cuda_peak_flops("NVIDIA GeForce GTX 1080") is None  # unknown: no MFU is logged


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    sc = LMTrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_frac=0.1)
    assert lr_at(0, sc) == pytest.approx(0.1) and lr_at(9, sc) == pytest.approx(1.0)
    assert lr_at(60, sc) == pytest.approx(0.55) and lr_at(110, sc) == pytest.approx(0.1)


def test_batches_are_a_pure_function_of_the_step():
    stream = np.arange(1000, dtype=np.uint16) % 300
    a, b = get_batch(stream, 5, 4, 16, 0, 0), get_batch(stream, 5, 4, 16, 0, 0)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4])) and a[4] is None
    idx, targets, _, _, _ = a
    assert torch.equal(idx[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one


def test_example_batches_shift_the_loss_mask_with_the_targets():
    examples = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 1])]
    idx, targets, loss_mask, attn, _ = get_batch(examples, 0, 2, 16, 0, pad_id=0)
    for row in range(2):  # the loss counts exactly where the target is a reply token
        ids, mask = examples[0] if idx[row, 0] == 5 else examples[1]  # rows are shuffled
        n = len(ids) - 1
        assert targets[row, :n].tolist() == ids[1:] and loss_mask[row, :n].tolist() == mask[1:]
        assert loss_mask[row, n:].sum() == 0 and attn[row, :n].sum() == n


def test_packed_batches_give_the_same_loss_as_padded_ones():
    # SFT packing (sc.pack) changes the batch layout, not the objective: the mean loss over the same
    # reply tokens is the same as with one right-padded example per row
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 12, 7, 4):
        ids = torch.randint(1, 300, (n,), generator=g).tolist()
        k = torch.randint(1, n - 1, (1,), generator=g).item()  # prompt length
        examples.append((ids, [0] * k + [1] * (n - k)))
    rows = pack_examples(examples, 16, pad_id=0, seed=0)
    assert all(len(ids) == len(mask) == len(seg) == 17 for ids, mask, seg in rows)
    assert sum(len(set(seg) - {-1}) for _, _, seg in rows) == len(examples)  # each example once
    assert sum(sum(mask) for _, mask, _ in rows) == sum(sum(m) for _, m in examples)
    model = tiny_model()
    idx, targets, loss_mask, attn, segment_ids = get_batch(rows, 0, len(rows), 16, 0, pad_id=0)
    packed = model(idx, targets, loss_mask=loss_mask, segment_ids=segment_ids)[1]
    idx, targets, loss_mask, _, none = get_batch(examples, 0, len(examples), 16, 0, pad_id=0)
    assert none is None
    assert torch.allclose(packed, model(idx, targets, loss_mask=loss_mask)[1], atol=1e-5)


def test_packing_fills_rows_by_best_fit():
    # six 9-token and six 8-token examples fill six 17-token rows exactly (9 + 8): best fit finds that, where
    # filling rows in a random order leaves room a 9 cannot use; each row holds two whole examples, no padding
    examples = [([1] * n, [0] + [1] * (n - 1)) for n in (9, 8) * 6]
    rows = pack_examples(examples, 16, pad_id=0, seed=0)
    assert len(rows) == 6
    assert all(seg.count(0) + seg.count(1) == 17 and -1 not in seg for _, _, seg in rows)


def run_stage(out_dir, fail_at=None, fail_with=RuntimeError, poison_at=None, max_steps=12, val_curve=None,
              dropout=0.0, stop_in_forward_at=None):
    """A 12-step pretraining run; `fail_at` makes the data loader die at that micro-batch,
    `poison_at` turns the weights to NaN there (a numerical blow-up). `val_curve` {step: loss} stands in
    for the validation losses (validations at steps 0, 4, 8 and 12) and turns keep_best on."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model, tok = tiny_model(dropout=dropout), Tokenizer.gpt2()
    stream = (np.arange(3000) * 7 % 300).astype(np.uint16)
    if stop_in_forward_at is not None:  # Ctrl-C lands after the forward drew this step's dropout masks
        forward, calls = model.forward, []

        def interrupted_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls.append(model.training)
            if sum(calls) == stop_in_forward_at + 1:
                os.kill(os.getpid(), signal.SIGINT)
            return out
        model.forward = interrupted_forward
    sc = LMTrainConfig(max_steps=max_steps, batch_size=4, eval_interval=4, eval_batches=1, log_interval=2,
                       warmup_steps=2, lr=1e-2, keep_best=val_curve is not None)
    path = str(out_dir / "base.pt")
    next_step = [load_checkpoint(path)["step"] if os.path.exists(path) else 0]  # a resumed run starts there

    def data(*args):
        if args[1] == fail_at:
            raise fail_with("power cut")
        if args[1] == poison_at:
            with torch.no_grad():
                model.transformer.wte.weight.fill_(float("nan"))
        if args[0] is stream:
            next_step[0] = args[1] + 1  # one micro-batch a step
        return get_batch(*args)
    fake_val = lambda *args, **kwargs: val_curve[next_step[0]]  # noqa: E731
    original = get_batch, train.evaluate_loss
    train.get_batch, train.evaluate_loss = data, fake_val if val_curve else train.evaluate_loss
    try:
        supervised_train(Cfg, "pretrain", sc, model, tok, stream, stream[:500], path, MetricsLog(str(out_dir)))
    finally:
        train.get_batch, train.evaluate_loss = original
    return model


def test_a_crash_resumes_from_the_last_checkpoint_to_identical_weights(tmp_path):
    full = run_stage(tmp_path / "full")
    with pytest.raises(RuntimeError):
        run_stage(tmp_path / "crash", fail_at=10)  # dies after the step-8 checkpoint
    assert load_checkpoint(str(tmp_path / "crash" / "base.pt"))["step"] == 8
    resumed = run_stage(tmp_path / "crash")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    full = run_stage(tmp_path / "full")
    with pytest.raises(SystemExit):
        run_stage(tmp_path / "stop", fail_at=6, fail_with=KeyboardInterrupt)
    assert load_checkpoint(str(tmp_path / "stop" / "base.pt"))["step"] == 6
    resumed = run_stage(tmp_path / "stop")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_ctrl_c_mid_step_with_dropout_resumes_exactly(tmp_path):
    """A real SIGINT that arrives mid-step, after dropout drew its masks: the step finishes, the
    checkpoint holds the next step and the RNG state at its start, and the rerun ends bit for bit
    where an uninterrupted run ends."""
    full = run_stage(tmp_path / "full", dropout=0.3)
    with pytest.raises(SystemExit):
        run_stage(tmp_path / "stop", dropout=0.3, stop_in_forward_at=6)
    assert load_checkpoint(str(tmp_path / "stop" / "base.pt"))["step"] == 7
    resumed = run_stage(tmp_path / "stop", dropout=0.3)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def val_rows(out_dir):
    """(step, val loss, best step) of each validation row in metrics.jsonl, in the order they were logged."""
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [(r["step"], r["pretrain/val_loss"], r.get("pretrain/best_step")) for r in rows if "pretrain/val_loss" in r]


@pytest.mark.parametrize("stop", [
    {"stop_in_forward_at": 3},                       # Ctrl-C in step 3: held, the checkpoint is step 4's, unvalidated
    {"fail_at": 4, "fail_with": KeyboardInterrupt},  # Ctrl-C in step 4, after its validation ran and was logged
], ids=["before-validation", "after-validation"])
def test_ctrl_c_at_a_validation_step_ends_as_an_uninterrupted_run(tmp_path, stop):
    """A run stopped by Ctrl-C at step 4, a validation step whose loss is the lowest, and resumed: it validates
    at step 4 exactly once, so it keeps step 4's weights and logs the same validation rows as a run never
    stopped. (Resuming at step 4 without its validation would keep step 12's weights and lose the row.)"""
    curve = {0: 5.0, 4: 2.0, 8: 3.0, 12: 2.5}
    full = run_stage(tmp_path / "full", val_curve=curve)
    with pytest.raises(SystemExit):
        run_stage(tmp_path / "stop", val_curve=curve, **stop)
    assert load_checkpoint(str(tmp_path / "stop" / "base.pt"))["step"] == 4
    resumed = run_stage(tmp_path / "stop", val_curve=curve)
    assert same_weights(full.state_dict(), resumed.state_dict())
    assert load_checkpoint(str(tmp_path / "stop" / "base.pt"))["best"] == {"step": 4, "val_loss": 2.0}
    assert val_rows(tmp_path / "stop") == val_rows(tmp_path / "full") == [
        (0, 5.0, None), (4, 2.0, None), (8, 3.0, None), (12, 2.5, 4)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match="step 9"):
        run_stage(tmp_path / "nan", poison_at=9)
    ckpt = load_checkpoint(str(tmp_path / "nan" / "base.pt"))
    assert ckpt["step"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_ends_with_the_best_validation_weights(tmp_path):
    """Validation loss is lowest at step 8 and rises by the last step (12): keep_best (pretrain's default)
    ends the stage with step 8's weights, in memory and in base.pt, names the step, and cleans up."""
    curve = {0: 5.0, 4: 3.0, 8: 2.0, 12: 2.5}
    model = run_stage(tmp_path / "full", val_curve=curve)
    with pytest.raises(RuntimeError):
        run_stage(tmp_path / "at8", fail_at=8, val_curve=curve)  # leaves the weights of step 8 in its checkpoint
    at8 = load_checkpoint(str(tmp_path / "at8" / "base.pt"))
    assert at8["step"] == 8
    ckpt = load_checkpoint(str(tmp_path / "full" / "base.pt"))
    assert ckpt["done"] and ckpt["best"] == {"step": 8, "val_loss": 2.0} and ckpt["val_loss"] == 2.0
    assert same_weights(ckpt["model"], at8["model"]) and same_weights(model.state_dict(), at8["model"])
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert rows[-1]["step"] == 12 and rows[-1]["pretrain/val_loss"] == 2.5 and rows[-1]["pretrain/best_step"] == 8
    assert not os.path.exists(tmp_path / "full" / "base.best.pt")


@pytest.mark.parametrize("curve, lose_best_file", [
    ({0: 5.0, 4: 2.0, 8: 3.0, 12: 2.5}, False),  # the best (step 4) is older than the last checkpoint (8)
    ({0: 5.0, 4: 3.0, 8: 2.0, 12: 2.5}, True),   # killed after step 8's checkpoint, before its best file
])
def test_best_weights_survive_a_kill(tmp_path, curve, lose_best_file):
    full = run_stage(tmp_path / "full", val_curve=curve)
    with pytest.raises(RuntimeError):
        run_stage(tmp_path / "crash", fail_at=10, val_curve=curve)  # dies after the step-8 checkpoint
    if lose_best_file:
        os.remove(tmp_path / "crash" / "base.best.pt")
    resumed = run_stage(tmp_path / "crash", val_curve=curve)
    assert same_weights(full.state_dict(), resumed.state_dict())
    assert same_weights(load_checkpoint(str(tmp_path / "full" / "base.pt"))["model"],
                        load_checkpoint(str(tmp_path / "crash" / "base.pt"))["model"])
