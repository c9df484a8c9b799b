"""The command line: presets and flags are typed, and every mistake is one clear line, not a traceback."""
import re

import pytest

import rlhf


def test_presets_then_flags_override_with_types():
    stage, cfg = rlhf.parse_args(["sft", "--preset", "tiny", "--sft.lr=0.01", "--sft.max_steps", "7", "--force"])
    assert stage == "sft" and cfg.preset == "tiny" and cfg.model.n_layer == 2
    assert cfg.sft.lr == 0.01 and cfg.sft.max_steps == 7 and cfg.force is True


def test_every_preset_names_real_fields():
    for name in rlhf.PRESETS:
        rlhf.parse_args(["--preset", name])  # raises ConfigError on a stale key


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "unknown stage 'bogus'; choose from: all, pretrain"),
    (["--preset", "huge"], "unknown preset 'huge'; choose from: tiny"),
    (["--sft.lrr=1"], "unknown flag --sft.lrr; did you mean lr"),
    (["--nope.lr=1"], "unknown config section 'nope'"),
    (["--sft.lr=fast"], "--sft.lr expects float, got 'fast'"),
    (["--force=maybe"], "--force expects bool"),
    (["stray"], "unknown stage"),
    (["sft", "stray"], "unexpected argument 'stray'"),
])
def test_bad_command_lines_give_one_clear_line(argv, message, capsys):
    assert rlhf.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--dpo.betas=0.1,x"], "--dpo.betas expects comma-separated numbers, got '0.1,x'"),
    (["--rm.init=pm_a"], "--rm.init must be policy, sft, cd or base, got 'pm_a'"),
    (["--rm.objective=lm"], "--rm.objective must be ranking or binary"),
    (["--dpo.beta=0"], "--dpo.beta and --dpo.betas must be > 0"),
    (["--cd.prompt_file=/no/such/prompt.txt"], "--cd.prompt_file: /no/such/prompt.txt: cannot read it"),
    (["studies", "--studies.size=true", "--studies.sizes=1x64,3y7"], "--studies.sizes: '3y7' is neither"),
    (["studies", "--studies.size=true", "--studies.sizes=1x64,0x64"], "--studies.sizes: '0x64' is neither"),
    (["studies", "--studies.size=true", "--studies.sizes=1x64,gpt2"], "gpt2 is GPT-2's weights, which need"),
    (["studies", "--studies.size=true", "--studies.sizes=2x64"], "needs two or more trunks"),
    (["--dtype=fp16"], "--dtype must be one of auto, float32, bfloat16, float16, got 'fp16'"),
    (["--label.task=honest"], "--label.task must be helpful or harmless, got 'honest'"),
    (["--label.policies=sft,rs,ppo"], "--label.policies needs two policies, e.g. sft,ppo, got 3"),
    (["--label.policies=sft"], "--label.policies needs two policies"),
    (["--label.best_of=1"], "--label.best_of must be 0 (two policies) or at least 2"),
    (["--label.split=val"], "--label.split must be train or test"),
    (["--online.method=dpo"], "--online.method must be rs or ppo, got 'dpo'"),
    (["--online.labeler=gpt4"], "--online.labeler must be pm_b or human, got 'gpt4'"),
    (["--eval.elo_labels=/no/such/decisions.jsonl"], "--eval.elo_labels: /no/such/decisions.jsonl not found"),
])
def test_bad_values_stop_before_any_stage_runs(argv, message):
    """parse_args, not the stage that reads the value: `all` would otherwise train for minutes first."""
    with pytest.raises(ValueError, match=re.escape(message)):  # ConfigError is one
        rlhf.parse_args(argv + ["--preset", "tiny"])


def test_missing_data_dir_is_one_clear_line(tmp_path, capsys):
    assert rlhf.main(["pretrain", "--preset", "tiny", "--out_dir", str(tmp_path),
                      "--data_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--data_dir" in err and "Traceback" not in err


def test_failed_gpt2_download_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    assert rlhf.main(["pretrain", "--preset", "tiny", "--data.vocab=gpt2", "--pretrain.init=gpt2",
                      "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--pretrain.init" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_script_restarts_once_with_glibc_malloc_limits_and_passive_threads_when_busy(monkeypatch):
    """`python rlhf.py` re-executes itself once with GLIBC_TUNABLES (fewer page faults a CPU step) and, on a
    machine already busy, OMP_WAIT_POLICY=PASSIVE; never with a variable already set: by the user, or by the
    first start."""
    import os
    import sys
    glibc = sys.platform == "linux" and "glibc" in os.confstr("CS_GNU_LIBC_VERSION")
    assert rlhf.start_env({}, 0.3) == ({"GLIBC_TUNABLES": rlhf.MALLOC_TUNABLES} if glibc else {})
    assert rlhf.start_env({"GLIBC_TUNABLES": "x"}, 1.5) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert rlhf.start_env({"GLIBC_TUNABLES": "x", "OMP_WAIT_POLICY": "ACTIVE"}, 4.0) == {}
    calls = []
    monkeypatch.setattr(rlhf.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(rlhf.os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    rlhf.restart_with_start_env()
    (exe, argv, env), = calls
    assert exe == sys.executable and argv[1:] == sys.argv and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env.get("GLIBC_TUNABLES") == (rlhf.MALLOC_TUNABLES if glibc else None)
    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    rlhf.restart_with_start_env()
    assert calls == []
