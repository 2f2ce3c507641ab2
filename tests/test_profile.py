"""Hardware profiles: `auto` sizes the loop for the machine; an explicit setting wins."""

import os

from ops.up import profile_line
from strop.settings import PROFILES, Settings, detect_profile


def test_small_cpu_profile_sizes_the_loop_and_explicit_values_win(monkeypatch):
    monkeypatch.setenv("STROP_PROFILE", "small-cpu")
    monkeypatch.setenv("STROP_N_VOTES", "12")
    s = Settings()
    assert s.profile == "small-cpu"
    assert s.n_votes == 12  # given by its own variable: the profile does not touch it
    assert s.sample_max_tokens == PROFILES["small-cpu"]["sample_max_tokens"] == 96
    assert s.batch_size == 1 and s.steps_per_version == 16
    assert s.grpo_overlong_penalty == 0.5  # a cut answer loses half a point of reward
    assert Settings(profile="gpu").grpo_overlong_penalty == 0.0
    assert Settings(profile="gpu").sample_max_tokens == 256  # the class defaults


def test_auto_profile_follows_the_cores_and_the_gpu(monkeypatch):
    # a mock of the hardware: this machine cannot grow cores or a GPU for the test
    monkeypatch.setattr("strop.settings.shutil.which", lambda _: None)
    monkeypatch.setattr("strop.settings.Path.is_dir", lambda _: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(2)))
    assert detect_profile() == "small-cpu" and Settings().profile == "small-cpu"
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    assert detect_profile() == "cpu"
    assert detect_profile("cuda") == "gpu"
    monkeypatch.setattr("strop.settings.shutil.which", lambda name: "/usr/bin/" + name)
    assert detect_profile() == "gpu" and Settings().n_votes == 16


def test_strop_up_profile_line_names_the_profile_and_its_values():
    line = profile_line(Settings(profile="small-cpu", n_votes=5))
    assert line.startswith("profile small-cpu")
    assert "n_votes=5" in line and "sample_max_tokens=96" in line and "algorithm=grpo" in line
