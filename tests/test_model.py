"""model.py: GhostNet sizes against the reference work and timm, every arch's shapes, the ghost op
against a module-by-module GhostModule, BN folding, MACs, and the checkpoint loader's refusals."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghost_ext
import model as M
import runs
from ghost_ext import reference

warnings.filterwarnings("ignore", message="ghost_ext")
torch.set_num_threads(min(2, torch.get_num_threads()))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters and running statistics, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


# ----------------------------------------------------------------------------------------------
# sizes


def test_ghostnet_param_count_matches_reference_work():
    # "Best Model settings" of the reference work: num_params 3041412 (196 classes, out_channels 320)
    assert M.count_params(M.build_model("ghostnet", 196)) == 3_041_412
    assert M.count_params(M.build_model("ghostnet", 196, out_channels=1280)) == 4_153_092


def test_grayscale_changes_only_the_stem():
    rgb = M.build_model("ghostnet", 196).state_dict()
    gray = M.build_model("ghostnet", 196, in_channels=1).state_dict()
    assert rgb.keys() == gray.keys()
    differ = [k for k in rgb if rgb[k].shape != gray[k].shape]
    assert differ == ["conv_stem.weight"] and gray["conv_stem.weight"].shape == (16, 1, 3, 3)


def test_ghostnet_official_param_count_and_width():
    assert M.count_params(M.build_model("ghostnet_official", 1000)) == 5_182_508
    assert M.count_params(M.build_model("ghostnet_official", 1000, width=0.5)) < 5_182_508 // 2


def test_ghostnet_official_matches_timm():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("ghostnet_100", pretrained=False)
    ours = M.build_model("ghostnet_official", 1000, ghost_op="torch")
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()  # timm's names, no mapping needed
    assert all(a[k].shape == b[k].shape for k in a)
    # same weights -> same function, in eval and in training (batch statistics, running updates)
    _randomize_bn(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert _rel_err(ours(x), ref(x)) < 1e-5
    ours.train(), ref.train()
    ours.dropout.p = ref.drop_rate = 0.0
    with torch.no_grad():
        assert _rel_err(ours(x), ref(x)) < 1e-4
    a, b = ours.state_dict(), ref.state_dict()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), k


def test_reference_variant_layout():
    m = M.build_model("ghostnet", 10, out_channels=64, dropout=0.3)
    se = m.blocks[3][0].se
    assert isinstance(se.fc1, nn.Linear) and se.fc1.out_features == 72 // 4  # no rounding
    assert isinstance(m.blocks[3][0].shortcut[0], nn.Conv2d) and m.blocks[3][0].shortcut[0].kernel_size == (5, 5)
    c = m.classifier
    assert c[0].bias is None and c[0].in_features == 960 and c[0].out_features == 64
    assert isinstance(c[1], nn.BatchNorm1d) and c[3].p == 0.3 and c[4].out_features == 10


def test_peer_options():
    assert M.build_model("mobilenet_v2", 7, dropout=0.3).classifier[0].p == 0.3
    assert M.build_model("squeezenet1_1", 7, dropout=0.1).classifier[0].p == 0.1
    assert M.build_model("resnet18", 7, dropout=0.3).fc.out_features == 7  # no dropout: ignored
    r = M.build_model("resnet18", 7, in_channels=1)
    assert r.conv1.in_channels == 1


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'vgg'; choose one of: ghostnet, ghostnet_official"):
        M.build_model("vgg", 10)
    with pytest.raises(ValueError, match="ghost_op"):
        M.build_model("ghostnet", 10, ghost_op="cuda")
    with pytest.raises(ValueError, match="ghost_op"):
        M.set_ghost_op(M.build_model("ghostnet", 10), "fast")


# ----------------------------------------------------------------------------------------------
# every arch: shapes, grayscale, train/eval, channels_last

_cache: dict = {}


def _model(arch: str, in_channels: int) -> nn.Module:
    key = (arch, in_channels)
    if key not in _cache:
        torch.manual_seed(0)
        _cache[key] = M.build_model(arch, 5, in_channels=in_channels)
    return _cache[key]


@pytest.mark.parametrize("arch", M.ARCHS)
def test_output_shapes(arch):
    for c in (3, 1):
        m = _model(arch, c)
        for size, modes in ((64, (True, False)), (227, (c == 1,))):  # 227: RGB eval, grayscale train
            x = torch.randn(2, c, size, size)
            for training in modes:
                m.train(training)
                with torch.no_grad():
                    assert m(x).shape == (2, 5), (arch, c, size, training)
    m.eval()


@pytest.mark.parametrize("arch", M.ARCHS)
def test_channels_last_input(arch):
    m = _model(arch, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        out = m(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        out2 = m.to(memory_format=torch.channels_last)(x)
        m.to(memory_format=torch.contiguous_format)
    assert torch.allclose(out2, ref, rtol=1e-4, atol=1e-5)


def test_backward_runs_and_counts_bn_batches():
    m = M.build_model("ghostnet", 5).train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    gm = m.blocks[0][0].ghost1
    assert gm.cheap_operation[0].weight.grad is not None and gm.cheap_operation[1].weight.grad is not None
    assert int(gm.cheap_operation[1].num_batches_tracked) == 1


# ----------------------------------------------------------------------------------------------
# the ghost op


def _module_ghost(c_in_primary: int, out: int, relu: bool, k: int = 3):
    """The textbook cheap branch: depthwise conv, BN, ReLU, cat, slice (as nn modules)."""
    conv = nn.Conv2d(c_in_primary, c_in_primary, k, 1, k // 2, groups=c_in_primary, bias=False)
    bn = nn.BatchNorm2d(c_in_primary)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)

    def forward(x):
        y = bn(conv(x))
        if relu:
            y = nn.ReLU()(y)
        return torch.cat([x, y], 1)[:, :out]
    return conv, bn, forward


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("out", [14, 13])  # even, odd (C = 7: 13 cuts the last cheap map)
@pytest.mark.parametrize("training", [True, False])
def test_reference_op_matches_modules(relu, out, training):
    torch.manual_seed(0)
    c = 7
    conv, bn, forward = _module_ghost(c, out, relu)
    bn.train(training)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(3, c, 9, 8)
    want = forward(x)
    got = reference.ghost_concat(x, conv.weight, bn.weight, bn.bias, rm, rv, training, bn.momentum, bn.eps,
                                 relu, out)
    assert got.shape == (3, out, 9, 8)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rm, bn.running_mean) and torch.allclose(rv, bn.running_var)


@pytest.mark.parametrize("out", [14, 13])
def test_ghost_module_matches_module_by_module(out):
    """Our GhostModule (through ghost_ext) == the same weights run as plain modules, both modes."""
    torch.manual_seed(0)
    gm = M.GhostModule(5, out, relu=True, ghost_op="torch")
    _randomize_bn(gm)
    bn = gm.cheap_operation[1]
    plain_p, plain_c = copy.deepcopy(gm.primary_conv), copy.deepcopy(gm.cheap_operation)
    for training in (True, False):
        gm.train(training), plain_p.train(training), plain_c.train(training)
        x = torch.randn(2, 5, 6, 6)
        with torch.no_grad():
            p = plain_p(x)
            want = torch.cat([p, F.relu(plain_c(p))], 1)[:, :out]
            got = gm(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(bn.running_mean, plain_c[1].running_mean)
        assert torch.allclose(bn.running_var, plain_c[1].running_var)
        assert int(bn.num_batches_tracked) == int(plain_c[1].num_batches_tracked) == 1


@pytest.mark.skipif(not ghost_ext.has_extension(), reason="ghost_ext C++ extension not built")
def test_ghost_ops_give_the_same_model():
    torch.manual_seed(0)
    a = M.build_model("ghostnet", 5, ghost_op="torch")
    b = M.build_model("ghostnet", 5, ghost_op="ext")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 64, 64)
    # training: batch statistics over a few values per channel amplify float rounding (and the
    # classifier's BatchNorm1d over 4 samples even more), so compare the features loosely
    a.train(), b.train()
    with torch.no_grad():
        assert _rel_err(b.forward_features(x), a.forward_features(x)) < 1e-3
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), rtol=1e-3, atol=1e-5), k
    a.eval(), b.eval()
    with torch.no_grad():
        assert _rel_err(b(x), a(x)) < 1e-4
    M.set_ghost_op(b, "torch")
    assert all(m.ghost_op == "torch" for m in b.modules() if isinstance(m, M.GhostModule))


def test_ghost_module_one_path_switch():
    """GhostModule.path is the one switch: "op" by default, "modules" after convert_sync_batchnorm, "fused"
    after fuse_for_inference; the SyncBatchNorm
    path keeps the state_dict keys; the path alone, not a second dispatch in model.py, decides the forward."""
    net = M.build_model("ghostnet", 5, width=0.25, dropout=0.0, ghost_op="torch")
    ghosts = lambda m: [g for g in m.modules() if isinstance(g, M.GhostModule)]  # noqa: E731
    assert all(g.path == "op" for g in ghosts(net))
    synced = M.convert_sync_batchnorm(copy.deepcopy(net))
    assert all(g.path == "modules" for g in ghosts(synced))
    fused = M.fuse_for_inference(net.eval())
    assert all(g.path == "fused" for g in ghosts(fused))
    assert net.state_dict().keys() == synced.state_dict().keys()
    assert not hasattr(M, "_ext_kernel") and not hasattr(M, "_EXT_KERNEL")  # ghost_ext decides, alone

    gm = ghosts(fused)[0]
    assert M.convert_sync_batchnorm(gm).path == "fused"  # a folded module keeps its (eval-only) path


@pytest.mark.parametrize("ghost_op", M.GHOST_OPS)
def test_fused_ghost_module_asks_ghost_ext(monkeypatch, ghost_op):
    """The fused path hands the folded tensors and the ghost op's impl to ghost_ext.ghost_concat_folded,
    which chooses kernels or reference; model.py has no branch of its own."""
    gm = M.GhostModule(4, 7, relu=True, ghost_op=ghost_op).eval()
    M._fuse_ghost_module(gm)
    calls = []
    real = ghost_ext.ghost_concat_folded
    monkeypatch.setattr(ghost_ext, "ghost_concat_folded", lambda *a, **k: calls.append(k["impl"]) or real(*a, **k))
    if ghost_op == "ext" and not ghost_ext.has_kernel("cpu"):
        pytest.skip("needs the extension's CPU kernels")
    with torch.no_grad():
        out = gm(torch.randn(2, 4, 5, 5))
    assert calls == [ghost_op] and out.shape == (2, 7, 5, 5) and out.is_contiguous()


# ----------------------------------------------------------------------------------------------
# inference folding


@pytest.mark.parametrize("arch,ghost_op", [("ghostnet", "torch"), ("ghostnet", "auto"),
                                           ("ghostnet_official", "torch"), ("mobilenet_v3_large", "auto"),
                                           ("resnet18", "auto")])
def test_fuse_for_inference_matches(arch, ghost_op):
    torch.manual_seed(0)
    m = M.build_model(arch, 7, ghost_op=ghost_op)
    _randomize_bn(m)
    m.eval()
    fused = M.fuse_for_inference(m)
    # only the GhostModules' identity-like cheap-branch BNs stay (see model._fuse_ghost_module)
    assert [n for n, x in fused.named_modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)
            and not n.endswith("cheap_operation.1")] == []
    assert not any(p.requires_grad for p in fused.parameters())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = m(x)
        assert _rel_err(fused(x), want) <= 1e-5
        assert _rel_err(fused(x.contiguous(memory_format=torch.channels_last)), want) <= 1e-5
    assert m.training is False and any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # original untouched


def test_fused_ghostnet_is_eval_only_and_keeps_identity_bn():
    fused = M.fuse_for_inference(M.build_model("ghostnet", 7))
    with pytest.raises(RuntimeError, match="eval-only"):
        fused.train()
    bn = fused.blocks[0][0].ghost1.cheap_operation[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)
    assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var))


# ----------------------------------------------------------------------------------------------
# MACs


def test_count_macs():
    macs = M.count_macs(M.build_model("ghostnet_official", 1000), 224)
    assert abs(macs - 0.142e9) / 0.142e9 < 0.10  # the paper's 0.142 G multiply-adds
    r18 = M.count_macs(M.build_model("resnet18", 1000), 224)
    assert abs(r18 - 1.82e9) / 1.82e9 < 0.05  # the usual 1.8 G for ResNet-18
    assert M.count_macs(M.build_model("ghostnet", 196, in_channels=1), 227, in_channels=1) > 0


# ----------------------------------------------------------------------------------------------
# checkpoints


class _Evil:
    """Unpickling this calls open(marker, "w"): the file appears if the loader runs pickled code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(arch="ghostnet", n=4, **over) -> dict:
    m = M.build_model(arch, n, out_channels=32)
    ckpt = {"format": "ghostcars-v1", "arch": arch, "num_classes": n, "class_names": [f"car {i}" for i in range(n)],
            "model_options": {"out_channels": 32, "dropout": 0.2, "in_channels": 3, "width": 1.0},
            "preprocess": {"img_size": 64, "grayscale": False, "normalize": True, "mean": [0.5] * 3,
                           "std": [0.25] * 3, "crop_bbox": False, "bbox_margin": 0.0, "erase_background": False},
            "model": m.state_dict(), "epoch": 1,
            "best": {"val_acc": 0.5, "epoch": 1, "min_val_loss": 1.0, "min_val_loss_epoch": 1}, "config": {}}
    ckpt.update(over)
    return ckpt


def _one_line_error(path, match: str) -> str:
    with pytest.raises(runs.CheckpointError, match=match) as e:
        runs.load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_checkpoint_round_trip(tmp_path):
    ckpt = _checkpoint()
    torch.save(ckpt, tmp_path / "best.pt")
    loaded = runs.load_checkpoint(tmp_path / "best.pt")
    m = runs.model_from_checkpoint(loaded, ghost_op="torch")
    assert not m.training
    ref = M.build_model("ghostnet", 4, out_channels=32, ghost_op="torch").eval()
    ref.load_state_dict(ckpt["model"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


def test_checkpoint_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_checkpoint(extra=_Evil(str(marker))), path)
    _one_line_error(path, "refusing to load .*weights_only")
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_bad_files(tmp_path):
    _one_line_error(tmp_path / "missing.pt", "no such file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    _one_line_error(garbage, "not a checkpoint or corrupt")
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(), good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:5000])
    _one_line_error(trunc, "not a checkpoint or corrupt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    _one_line_error(other, "not a ghostcars-v1 checkpoint")


def test_checkpoint_inconsistent_contents(tmp_path):
    p = tmp_path / "c.pt"
    torch.save(_checkpoint(class_names=["a", "b", "c"]), p)  # 3 names, 4 classes
    _one_line_error(p, "3 class_names for num_classes=4")
    five = _checkpoint(num_classes=5, class_names=list("abcde"))  # weights still for 4 classes
    torch.save(five, p)
    _one_line_error(p, "classifier .* does not fit num_classes=5")
    ck = _checkpoint()
    del ck["preprocess"]["img_size"]
    torch.save(ck, p)
    _one_line_error(p, "preprocess lacks img_size")
    torch.save({**_checkpoint(), "arch": "vgg16"}, p)
    _one_line_error(p, "unknown arch 'vgg16'")
    ck = _checkpoint()
    del ck["class_names"]
    torch.save(ck, p)
    _one_line_error(p, "lacks class_names")


def test_checkpoint_peer_arch(tmp_path):
    m = M.build_model("mobilenet_v3_small", 3)
    ck = _checkpoint(arch="mobilenet_v3_small", n=3, model=m.state_dict())
    torch.save(ck, tmp_path / "m.pt")
    assert isinstance(runs.model_from_checkpoint(runs.load_checkpoint(tmp_path / "m.pt")), nn.Module)


# ----------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_torch_compile_ghostnet_cpu():
    torch.manual_seed(0)
    m = M.build_model("ghostnet", 5, out_channels=16).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m)
    with torch.no_grad():
        assert _rel_err(compiled(x), m(x)) < 1e-4
