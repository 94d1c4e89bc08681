"""impl="auto"'s choice per call signature (ghost_ext/autotune.py), on the CPU with a fake timer and a fake check:
the faster wins, the reference stays within the timing noise, a failed check excludes the kernels at that
shape, each signature is decided once, and under deterministic algorithms nothing is timed."""
import random

import pytest
import torch

import ghost_ext
from ghost_ext import autotune
from test_op import make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def args_for(shape=(2, 4, 5, 5), k=3, training=True, oc=7):
    n, c, h, w = shape
    return (*make_inputs(n, c, h, w, k), training, 0.1, 1e-5, True, oc)


def sig_of(args):
    return autotune.signature(args[0], args[6], args[9], args[10], args[1])


class FakeTimer:
    """Seconds per impl, read from which impl the timed step runs (the chooser times ext first, then torch)."""

    def __init__(self, ext: float, ref: float):
        self.values, self.calls = [ext, ref], 0

    def __call__(self, fn, device):
        fn()  # the step really runs (it must not fail), only its time is made up
        value = self.values[self.calls % 2]
        self.calls += 1
        return value


def chooser(ext, ref, check=lambda args: True, noise=0.05):
    timer = FakeTimer(ext, ref)
    return autotune.Chooser(ghost_ext._run, check=check, timer=timer, noise=noise), timer


@pytest.mark.parametrize("ext,ref,want", [(1.0, 2.0, "ext"), (2.0, 1.0, "torch"), (0.97, 1.0, "torch"),
                                          (0.94, 1.0, "ext"), (1.0, 1.0, "torch")])
def test_faster_wins_and_the_reference_keeps_ties_within_noise(ext, ref, want):
    c, _ = chooser(ext, ref)
    a = args_for()
    assert c.choose(sig_of(a), a) == want
    assert c.timings[sig_of(a)] == (ext, ref)


def test_never_picks_the_kernels_when_slower_beyond_the_noise():
    rng = random.Random(0)
    for _ in range(50):
        ext, ref = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)
        c, _ = chooser(ext, ref, noise=0.05)
        a = args_for()
        if c.choose(sig_of(a), a) == "ext":
            assert ext < ref  # by at least the noise margin


def test_a_failed_check_excludes_the_kernels_at_that_shape_only():
    bad_shape = (2, 4, 5, 5)
    c, timer = chooser(0.1, 1.0, check=lambda args: tuple(args[0].shape) != bad_shape)
    a, b = args_for(bad_shape), args_for((2, 4, 6, 6))
    assert c.choose(sig_of(a), a) == "torch" and timer.calls == 0  # never timed where it failed
    assert c.choose(sig_of(b), b) == "ext"

    def raising(args):
        raise RuntimeError("no kernel for this shape")
    c2, _ = chooser(0.1, 1.0, check=raising)
    assert c2.choose(sig_of(a), a) == "torch"


def test_each_signature_is_decided_once():
    c, timer = chooser(0.5, 1.0)
    a = args_for()
    for _ in range(3):
        assert c.choose(sig_of(a), a) == "ext"
    assert timer.calls == 2  # ext and torch, once
    for other in (args_for(training=False), args_for(oc=8), args_for(k=5),
                  (a[0].to(memory_format=torch.channels_last), *a[1:])):
        c.choose(sig_of(other), other)
    assert len(c.decisions) == 5 and timer.calls == 10


def test_deterministic_algorithms_fix_the_choice_without_timing():
    c, timer = chooser(2.0, 1.0)  # the kernels would lose on time
    a = args_for()
    torch.use_deterministic_algorithms(True)
    try:
        assert c.choose(sig_of(a), a) == "ext"
    finally:
        torch.use_deterministic_algorithms(False)
    assert timer.calls == 0


@pytest.mark.skipif(not ghost_ext.has_kernel("cpu"), reason="needs the extension's CPU kernels (the real check)")
@pytest.mark.parametrize("training", [True, False])
def test_the_real_check_passes_the_kernels_and_catches_a_wrong_one(training):
    a = args_for(training=training)
    good = autotune.Chooser(ghost_ext._run)
    assert good._check(a)

    def wrong(impl, args):
        out = ghost_ext._run(impl, args)
        return out * 1.01 if impl == "ext" else out
    assert not autotune.Chooser(wrong)._check(a)


def test_auto_follows_the_choice_through_ghost_concat(monkeypatch):
    """The wiring: with the CPU enabled for autotuning, "auto" runs the reference where the reference won, and
    the kernels where they won, with the same numbers either way."""
    if not ghost_ext.has_kernel("cpu"):
        pytest.skip("needs the extension's CPU kernels")
    calls = []
    real_reference = ghost_ext._reference
    monkeypatch.setattr(ghost_ext, "_reference", lambda *a: calls.append(1) or real_reference(*a))
    monkeypatch.setattr(ghost_ext, "_AUTOTUNE_DEVICES", {"cpu"})
    a = args_for(training=False)
    for ext, ref, want_reference in [(2.0, 1.0, True), (0.5, 1.0, False)]:
        c, _ = chooser(ext, ref)
        monkeypatch.setattr(ghost_ext, "_chooser", c)
        calls.clear()
        out = ghost_ext.ghost_concat(*a, impl="auto")
        n_timing_refs = len(calls)  # the timing itself ran the reference too
        calls.clear()
        again = ghost_ext.ghost_concat(*a, impl="auto")
        assert bool(calls) == want_reference and n_timing_refs >= 1
        torch.testing.assert_close(out, again)
        torch.testing.assert_close(out, real_reference(*a), rtol=1e-5, atol=1e-5)
