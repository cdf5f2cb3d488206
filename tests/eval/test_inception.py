"""FID Inception: parity with an in-test torch copy of pytorch-fid's network, weight-file checks.

pytorch-fid is not installed (and nothing is downloaded): the torch classes below restate its
`fid_inception_v3` (torchvision's BasicConv2d / InceptionB / InceptionD plus FIDInceptionA, C,
E_1, E_2) and its InceptionV3 forward (bilinear resize to 299, align_corners=False, blocks, global
average pool). A randomly initialised copy with calibrated, then perturbed BatchNorm statistics is
saved as a state_dict and read back by our loader.
"""
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unclip_jax.eval import inception_weights
from unclip_jax.eval.inception import InceptionFeatures, param_shapes


# ----------------------------------------------------------------- torch reference (pytorch-fid)
class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """E_1 (pool="avg", count_include_pad=False) and E_2 (pool="max")."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            p = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)


class TorchFIDInception(nn.Module):
    """Module names as in torchvision's Inception3 (num_classes=1008, no aux), so the state_dict
    has pytorch-fid's tensor names; forward = pytorch-fid InceptionV3 up to pool3."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, "avg")
        self.Mixed_7c = FIDInceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)   # in the real file; unused for pool3

    def forward(self, x):  # x in [0, 1], NCHW (pytorch-fid's convention)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    torch.manual_seed(0)
    net = TorchFIDInception()
    # Calibrate the BN running stats on random images (momentum None = exact average) so the
    # activations keep a sane scale through ~94 layers, then perturb every BN parameter so a
    # loader that dropped or swapped any of them would show.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 96, 96))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.mul_(1 + 0.2 * torch.rand(c)).add_(0.05 * torch.randn(c))
                m.running_var.mul_(0.5 + torch.rand(c))
                m.weight.copy_(0.5 + torch.rand(c))
                m.bias.copy_(0.1 * torch.randn(c))
    net.eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(net.state_dict(), path)
    return net, str(path)


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_pool3_features_match_pytorch_fid_network(torch_reference, tmp_path):
    net, path = torch_reference
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)  # upsampled to 299 inside
    with torch.no_grad():
        ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    assert ref.shape == (3, 2048) and np.std(ref) > 1e-3  # a live network, not all zeros

    feats = InceptionFeatures(inception_weights.load_inception_params(path))
    got_u8 = feats(images)
    assert got_u8.shape == (3, 2048) and got_u8.dtype == np.float32
    assert _rel_err(got_u8, ref) < 1e-4, _rel_err(got_u8, ref)
    # different images give different features (the comparison above is not vacuous)
    assert _rel_err(ref[1:2], ref[:1]) > 0.05

    # the .npz conversion gives the same network without torch; run it batch-sharded over 4
    # of the test devices (3 images are padded to 4 and the padding dropped; each image costs
    # ~0.3 s of CPU at the tests' -O0, so not over all 8), on the same images as [-1, 1]
    # floats
    npz = str(tmp_path / "inception.npz")
    assert inception_weights.convert_file(path, npz) > 0
    with np.load(npz) as f:
        assert "Mixed_7c.branch_pool.conv.weight" in f.files and "fc.weight" in f.files
    mesh = jax.make_mesh((4, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = InceptionFeatures(inception_weights.load_inception_params(npz), mesh=mesh)
    got_f = sharded(images.astype(np.float32) / 127.5 - 1.0)
    assert got_f.shape == (3, 2048) and _rel_err(got_f, ref) < 1e-4, _rel_err(got_f, ref)


def test_downsampling_resize_matches_torch_bilinear(torch_reference):
    """Large inputs are downsized without antialiasing, as pytorch-fid does."""
    net, path = torch_reference
    images = np.random.default_rng(1).integers(0, 256, (1, 331, 320, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    got = InceptionFeatures(inception_weights.load_inception_params(path))(images)
    assert _rel_err(got, ref) < 1e-4, _rel_err(got, ref)


def _fake_state():
    """A complete pytorch-fid-named state of zeros/ones from the Flax shapes."""
    state = {}
    for path, leaf in inception_weights._conv_paths(inception_weights._plain(param_shapes())):
        kh, kw, cin, cout = leaf["kernel"].shape
        name = ".".join(path)
        state[f"{name}.conv.weight"] = np.zeros((cout, cin, kh, kw), np.float32)
        for f in ("weight", "running_var"):
            state[f"{name}.bn.{f}"] = np.ones((cout,), np.float32)
        for f in ("bias", "running_mean"):
            state[f"{name}.bn.{f}"] = np.zeros((cout,), np.float32)
    return state


def test_loader_names_a_tensor_with_the_wrong_shape(tmp_path):
    state = _fake_state()
    inception_weights.convert_state(state)  # the complete fake state is accepted
    state["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **state)
    with pytest.raises(ValueError,
                       match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*\(128, 128, 1, 7\)"):
        inception_weights.load_inception_params(bad)


def test_loader_names_a_missing_tensor(tmp_path):
    state = _fake_state()
    del state["Mixed_7c.branch_pool.bn.running_var"]
    path = str(tmp_path / "partial.npz")
    np.savez(path, **state)
    with pytest.raises(KeyError, match=r"Mixed_7c\.branch_pool\.bn\.running_var"):
        inception_weights.load_inception_params(path)
    with pytest.raises(KeyError, match="running_var"):  # the converter refuses it too
        inception_weights.convert_file(path, str(tmp_path / "out.npz"))
    assert not os.path.exists(tmp_path / "out.npz")
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        inception_weights.convert_file(path, str(tmp_path / "out.bin"))


def test_missing_weights_file_says_where_to_get_them(tmp_path):
    path = str(tmp_path / "nope" / inception_weights.WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(inception_weights.load_inception_params(path))
    msg = str(e.value)
    assert path in msg and "pytorch-fid" in msg and "nothing is downloaded" in msg
