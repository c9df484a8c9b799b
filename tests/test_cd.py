"""Context distillation (cd.py): the loss is 0 when teacher and student see the same context, its gradient is
softmax(student) - softmax(teacher), the student's loss and its gradients are those of the KL of two plain
forwards (the teacher's read after the prompt), the stage's own examples and batches (cd_examples through
train.get_batch, cut to room + 1 tokens) distill every next token of the dialogue's end, and a few steps under
bf16 autocast bring it down. A bad prompt file, --cd.pack or --policy_init is one line. (lm_loss.distill_loss
against the plain formula: test_lm_loss.py.)"""
import gzip
import json

import pytest
import torch
import torch.nn.functional as F

import cd
import rlhf
from cd import CDConfig, ContextDistilled, check_config, read_prompt
from data import DataConfig, read_pairs
from lm_loss import distill_loss
from model import GPT, GPTConfig
from runtime import ConfigError, Run, batch_rows, model_checkpoint, save_checkpoint
from tokens import Tokenizer
from train import get_batch, load_data


def teacher_and_student(context, move=0.0):
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    student = ContextDistilled(teacher.config, teacher, context)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(move * torch.randn_like(p))
    return teacher, student


def test_the_loss_is_zero_when_teacher_and_student_see_the_same_context():
    _, student = teacher_and_student(context=[])
    idx = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    _, loss = student(idx, idx, loss_mask=torch.ones(3, 10))
    assert abs(loss.item()) < 1e-6
    _, with_prompt = teacher_and_student(context=[5, 6, 7])
    assert with_prompt(idx, idx, loss_mask=torch.ones(3, 10))[1].item() > 1e-4  # the prompt changes the teacher


def test_the_gradient_is_student_minus_teacher_probabilities_on_a_tiny_vocabulary():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], requires_grad=True)  # (1, 2, 3): V = 3
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
    mask = torch.tensor([[1.0, 0.0]])                                                    # the second position off
    identity = torch.eye(3)  # a head that passes its input through: the hidden states are the logits
    loss = distill_loss(student, identity, teacher, identity, mask)
    p, q = F.softmax(teacher[0, 0], -1), F.softmax(student[0, 0].detach(), -1)
    assert loss.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)     # KL(teacher || student)
    loss.backward()
    assert torch.allclose(student.grad[0, 0], q - p, atol=1e-6)
    assert torch.equal(student.grad[0, 1], torch.zeros(3))


def test_the_student_loss_and_its_gradients_are_those_of_the_kl_of_two_plain_forwards():
    """The slow reference: the teacher's full forward over prompt + dialogue, read from the prompt's end on,
    against the student's forward over the dialogue alone, at the positions the mask keeps."""
    context = [3, 4, 5, 6]
    teacher, student = teacher_and_student(context, move=0.2)
    idx = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0  # a shorter dialogue: right padding
    _, loss = student(idx, idx, loss_mask=mask)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    with torch.no_grad():
        t_logits = GPT.forward(teacher, torch.cat([torch.tensor([context] * 2), idx], 1))[0][:, len(context):]
    s_logits = GPT.forward(student, idx)[0]                                              # (2, 9, 40)
    p, log_q = F.softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    kl = (p * (p.log() - log_q)).sum(-1)                                                 # (2, 9)
    plain = (kl * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for a, b in zip(grads, torch.autograd.grad(plain, list(student.parameters()))):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(w.grad is None for w in teacher.parameters())  # the teacher is frozen
    assert set(student.state_dict()) == set(teacher.state_dict())  # saved as a plain GPT: no teacher, no prompt


def test_a_few_steps_under_bf16_autocast_bring_the_kl_down():
    # as supervised_train runs it: the forward under autocast, backward and the optimizer step outside
    teacher, student = teacher_and_student(context=[5, 6, 7])
    idx = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(4, 12)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = student(idx, idx, loss_mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_stage_distills_every_next_token_of_the_dialogues_last_room_plus_one_tokens(tmp_path, monkeypatch):
    """The stage's own examples and batches, against a hand-built expectation. With a prompt of L tokens and a
    block of block_size, each dialogue (prompt + chosen reply + EOS) keeps its last room + 1 = block_size - L + 1
    tokens; get_batch feeds all but the last, so the teacher reads L + room = block_size tokens at most, and every
    position of the kept dialogue predicts its next token under the distillation loss: at position t, the
    teacher's distribution after C + x[:t+1] against the student's after x[:t+1]."""
    (tmp_path / "hh" / "harmless-base").mkdir(parents=True)
    for split in ("train", "test"):
        with gzip.open(tmp_path / "hh" / "harmless-base" / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(12):  # every third prompt longer than the room: those are cut from the left
                prompt = f"\n\nHuman: question {i}: " + "tell me more about the weather tonight " * \
                         (1 + 11 * (i % 3 == 0)) + "\n\nAssistant:"
                f.write(json.dumps({"chosen": prompt + f" It is sunny {i}.", "rejected": prompt + " No."}) + "\n")
    (tmp_path / "prompt.txt").write_text("\n\nHuman: tell me about the weather\n\nAssistant: It is sunny tonight.\n")
    run = Run(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "hh"), device="cpu", seed=0,
              data=DataConfig(vocab="trimmed"))
    pairs, _ = read_pairs(run.data_dir, "train", run.data)
    tok = Tokenizer.trimmed([p.prompt + p.chosen + p.rejected for p in pairs])
    block_size = 96
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    (tmp_path / "out").mkdir()
    save_checkpoint(str(tmp_path / "out" / "base.pt"), model_checkpoint(base, tok, done=True))
    seen = {}
    monkeypatch.setattr(cd, "supervised_train", lambda run, name, cc, student, tok, train_ex, val_ex, *rest:
                        seen.update(student=student, train_ex=train_ex) or (0.0, 0.0))
    monkeypatch.setattr(cd, "show_samples", lambda *args, **kwargs: None)
    cd.stage_cd(run, CDConfig(prompt_file=str(tmp_path / "prompt.txt")), None, None)

    context = tok.encode((tmp_path / "prompt.txt").read_text().rstrip())
    L, room = len(context), block_size - len(context)
    assert 0 < L <= block_size - 64  # the prompt whole (read_prompt would cut a longer one)
    train_pairs = load_data(run, tok)[1]
    want = [(tok.encode(p.prompt) + tok.encode(p.chosen) + [tok.eos_id])[-(room + 1):] for p in train_pairs]
    assert [ids for ids, _ in seen["train_ex"]] == want
    assert all(mask == [0] + [1] * (len(ids) - 1) for ids, mask in seen["train_ex"])
    assert max(map(len, want)) == room + 1 and min(map(len, want)) < room  # some cut, some whole
    student = seen["student"]
    assert student.context.tolist() == context

    B = len(want)
    idx, targets, loss_mask, _, _ = get_batch(seen["train_ex"], 0, B, block_size, 0, tok.eos_id)
    assert L + idx.size(1) == block_size  # the longest row fills the teacher's context exactly
    _, loss = student(idx, targets, loss_mask)
    kl_sum, positions = 0.0, 0
    with torch.no_grad():
        for i in batch_rows(B, 0, B, 0):  # the rows get_batch drew; any order gives the same mean
            x = want[i][:-1]  # every position but the last predicts the next kept token
            p = F.softmax(GPT.forward(base, torch.tensor([context + x]))[0][0, L:], -1)          # (len(x), V)
            log_q = F.log_softmax(GPT.forward(student, torch.tensor([x]))[0][0], -1)             # (len(x), V)
            kl_sum += (p * (p.log() - log_q)).sum().item()
            positions += len(x)
    assert loss.item() == pytest.approx(kl_sum / positions, rel=1e-5) and loss.item() > 1e-4


class Tok:
    def encode(self, text):
        return [ord(c) % 40 for c in text]


def test_a_bad_prompt_file_is_one_line_and_a_long_one_keeps_its_end(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        read_prompt(CDConfig(prompt_file=str(tmp_path / "missing.txt")), Tok(), 256)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_prompt(CDConfig(prompt_file=str(tmp_path / "empty.txt")), Tok(), 256)
    long = tmp_path / "long.txt"
    long.write_text("\n\nHuman: hi\n\nAssistant: " + "yes " * 100)
    ids, cut = read_prompt(CDConfig(prompt_file=str(long)), Tok(), 256)
    assert len(ids) == 192 and cut == len(Tok().encode(long.read_text().rstrip())) - 192  # 64 left to the dialogue
    assert ids == Tok().encode(long.read_text().rstrip())[-192:]
    assert read_prompt(CDConfig(), Tok(), 1024)[1] == 0  # the shipped hhh_prompt.txt, whole


def test_a_bad_policy_init_is_one_line(tmp_path, capsys):
    assert rlhf.main(["ppo", "--preset", "tiny", "--out_dir", str(tmp_path), "--policy_init=dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --policy_init must be sft or cd, got 'dpo'"


def test_packed_rows_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    # a packed row holds several dialogues: the student would attend across them and the teacher's prompt would
    # come once a row, before the first only. No base.pt exists here: the refusal comes before the stage loads it
    with pytest.raises(ConfigError, match="--cd.pack"):
        check_config(CDConfig(pack=True))
    check_config(CDConfig())  # unpacked, the shipped prompt: fine
    assert rlhf.main(["cd", "--preset", "tiny", "--out_dir", str(tmp_path), "--cd.pack=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cd.pack=true:") and "\n" not in err
    assert not (tmp_path / "cd.pt").exists()
