"""The model zoo: registry, shapes, ResNet-12 against a reference layout and its published
size, and exact second-order MAML meta-gradients (finite differences, float64) for every
zoo model with SGD and Adafactor inner optimizers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt import models
from metaopt.maml import MAML
from metaopt.models import LSTMRegressor, ResNet12, TransformerClassifier, drop_block
from metaopt.optim import SGD, Adafactor
from metaopt.tasks import Omniglot
from metaopt.tasks.base import TaskBatch
from test_maml_helpers import fd_relative_errors

DT = torch.float64
FD_TOL = 1e-6


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_builds_each_model() -> None:
    assert models.names() == ["conv4", "lstm", "mlp", "resnet12", "transformer"]
    assert isinstance(models.get("MLP"), models.MLP)  # case-insensitive
    assert isinstance(models.get("conv4", ways=5), models.Conv4)
    assert isinstance(models.get("resnet12", ways=5, width=0.25), ResNet12)
    assert isinstance(models.get("transformer", num_classes=3, vocab_size=7), TransformerClassifier)
    assert isinstance(models.get("lstm", hidden=8), LSTMRegressor)
    assert models.factory("ResNet12") is ResNet12


def test_registry_errors_name_the_bad_value() -> None:
    known = "conv4, lstm, mlp, resnet12, transformer"
    with pytest.raises(ValueError, match=rf"Unknown model name: 'vgg'; known names: {known}$"):
        models.get("vgg")
    with pytest.raises(ValueError, match=r"Invalid arguments for model 'resnet12'.*depth"):
        models.get("resnet12", ways=5, depth=18)
    with pytest.raises(ValueError, match="width should be > 0 but is: -1"):
        models.get("resnet12", ways=5, width=-1)


def test_register_and_unregister_a_user_model() -> None:
    models.register("Linear4", lambda ways=5: nn.Linear(4, ways))
    try:
        assert "linear4" in models.names()
        assert models.get("linear4", ways=2)(torch.zeros(3, 4)).shape == (3, 2)
        models.register("linear4", lambda ways=5: nn.Linear(6, ways))  # replaces
        assert models.get("linear4").in_features == 6
    finally:
        models.unregister("linear4")
    assert "linear4" not in models.names()
    with pytest.raises(ValueError, match="Unknown model name: 'linear4'"):
        models.unregister("linear4")


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name, kwargs, x, out_shape",
    [
        ("mlp", {}, torch.zeros(10, 1), (10, 1)),
        ("conv4", {"ways": 5}, torch.zeros(3, 1, 28, 28), (3, 5)),
        ("resnet12", {"ways": 5, "width": 0.25}, torch.zeros(3, 1, 28, 28), (3, 5)),
        ("resnet12", {"ways": 20, "in_channels": 3, "width": 0.125}, torch.zeros(2, 3, 84, 84), (2, 20)),
        ("transformer", {"num_classes": 4, "vocab_size": 11, "d_model": 8, "nhead": 2, "max_len": 9},
         torch.randint(0, 11, (5, 9)), (5, 4)),
        ("transformer", {"num_classes": 4, "input_dim": 3, "d_model": 8, "nhead": 2},
         torch.zeros(5, 6, 3), (5, 4)),
        ("lstm", {"input_dim": 2, "hidden": 8, "output_dim": 3, "num_layers": 2}, torch.zeros(5, 7, 2), (5, 3)),
    ],
)
def test_output_shapes(name: str, kwargs: dict, x: torch.Tensor, out_shape: tuple[int, ...]) -> None:
    assert models.get(name, **kwargs)(x).shape == out_shape


def test_resnet12_channels_and_feature_shapes() -> None:
    net = ResNet12(ways=5, width=0.25)
    assert [b.conv1.out_channels for b in net.blocks] == [16, 40, 80, 160]
    x = torch.zeros(2, 1, 28, 28)
    assert net.blocks(x).shape == (2, 160, 1, 1)  # 28 -> 14 -> 7 -> 3 -> 1
    assert ResNet12(5, in_channels=3, width=0.125).blocks(torch.zeros(2, 3, 84, 84)).shape == (2, 80, 5, 5)
    assert [b.conv1.out_channels for b in ResNet12(5, width=0.01).blocks] == [1, 2, 3, 6]


def test_resnet12_parameter_count_matches_the_published_network() -> None:
    # MetaOptNet / learn2learn ResNet12 (miniImageNet, 3 input channels): 12.4M parameters.
    # Per block: three 3x3 convs and a 1x1 shortcut (no biases) + four affine batch norms.
    net = ResNet12(ways=5, in_channels=3)
    expected_blocks = 0
    for a, b in zip((3, 64, 160, 320), (64, 160, 320, 640)):
        expected_blocks += 9 * a * b + 2 * 9 * b * b + a * b + 4 * 2 * b
    assert expected_blocks == 12_424_320
    assert sum(p.numel() for p in net.blocks.parameters()) == expected_blocks
    assert sum(p.numel() for p in net.parameters()) == 12_424_320 + 640 * 5 + 5 == 12_427_525


class _ReferenceBlock(nn.Module):
    """MetaOptNet's BasicBlock as written there (torch BatchNorm2d, activation then pool)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.conv2, self.bn2 = nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.conv3, self.bn3 = nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.downsample = nn.Sequential(nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b))
        self.relu, self.maxpool = nn.LeakyReLU(0.1), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.relu(out + self.downsample(x)))


def test_resnet12_equals_the_reference_layout_values_and_second_derivatives() -> None:
    torch.manual_seed(0)
    net = ResNet12(ways=3, in_channels=3, width=0.0625).to(DT)  # 4-10-20-40 channels
    chans = [3, 4, 10, 20, 40]
    ref = nn.Sequential(*(_ReferenceBlock(a, b) for a, b in zip(chans[:-1], chans[1:]))).to(DT)
    head = nn.Linear(40, 3).to(DT)
    with torch.no_grad():  # random affine BN parameters, so they matter
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    renamed = {k.replace("shortcut", "downsample"): v for k, v in net.blocks.state_dict().items()}
    missing, unexpected = ref.load_state_dict(renamed, strict=False)
    assert not unexpected and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                                  for k in missing)  # the reference tracks stats; training mode ignores them
    head.load_state_dict(net.head.state_dict())
    x = torch.randn(6, 3, 20, 20, dtype=DT, requires_grad=True)
    ours = net(x)
    theirs = head(ref(x).mean((2, 3)))
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    # gradient of a gradient (what second-order MAML uses) agrees too
    w_ours, w_ref = net.blocks[1].conv2.weight, ref[1].conv2.weight
    g1 = torch.autograd.grad((ours**2).sum(), (x, w_ours), create_graph=True)
    g2 = torch.autograd.grad((theirs**2).sum(), (x, w_ref), create_graph=True)
    h1 = torch.autograd.grad(g1[0].square().sum() + g1[1].square().sum(), w_ours)[0]
    h2 = torch.autograd.grad(g2[0].square().sum() + g2[1].square().sum(), w_ref)[0]
    assert torch.allclose(g1[1], g2[1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(h1, h2, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ResNet12(ways=0), "ways must be a positive int but is: 0"),
        (lambda: ResNet12(ways=5, width=0), "width should be > 0 but is: 0"),
        (lambda: ResNet12(ways=5, drop_rate=1.0), r"drop_rate should be in \[0, 1\) but is: 1.0"),
        (lambda: ResNet12(ways=5, dropblock_size=-1), "dropblock_size must be an int >= 0 but is: -1"),
        (lambda: ResNet12(ways=5)(torch.zeros(2, 1, 8, 8)), r"H, W >= 16 .* shape \(2, 1, 8, 8\)"),
        (lambda: TransformerClassifier(3), "exactly one of vocab_size and input_dim"),
        (lambda: TransformerClassifier(3, vocab_size=5, input_dim=2), "exactly one of vocab_size and input_dim"),
        (lambda: TransformerClassifier(3, vocab_size=5, d_model=10, nhead=4), "nhead must divide d_model=10 but is: 4"),
        (lambda: TransformerClassifier(3, vocab_size=5, dropout=-0.1), r"dropout should be in \[0, 1\) but is: -0.1"),
        (lambda: TransformerClassifier(3, vocab_size=5, max_len=4)(torch.zeros(2, 5, dtype=torch.long)),
         r"L <= max_len=4 but got shape \(2, 5\)"),
        (lambda: TransformerClassifier(3, input_dim=2)(torch.zeros(2, 5)), r"\(N, L, input_dim\) features"),
        (lambda: LSTMRegressor(hidden=0), "hidden must be a positive int but is: 0"),
        (lambda: LSTMRegressor(input_dim=2)(torch.zeros(4, 3, 1)),
         r"expects \(N, L, 2\) sequences but got shape \(4, 3, 1\)"),
    ],
)
def test_bad_arguments_raise_one_line_errors(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# ----------------------------------------------------------------------------- dropout / DropBlock


def test_drop_block_drops_whole_blocks_at_the_asked_rate() -> None:
    torch.manual_seed(0)
    x = torch.ones(64, 8, 12, 12, dtype=DT)
    assert torch.equal(drop_block(x, 0.2, 3, training=False), x)
    assert torch.equal(drop_block(x, 0.0, 3), x)
    y = drop_block(x, 0.2, 3)
    kept = y != 0
    assert abs(1 - kept.to(DT).mean().item() - 0.2) < 0.03  # about p of the units dropped
    assert torch.allclose(y.sum(), x.sum())  # rescaled: the sum is kept exactly
    # every dropped unit lies in a fully dropped 3x3 square (blocks, not single units)
    dropped = (~kept).to(DT)
    full = F.avg_pool2d(dropped, 3, stride=1).eq(1).to(DT)  # (.., 10, 10): top-left corners
    covered = F.max_pool2d(F.pad(full, (2, 2, 2, 2)), 3, stride=1).bool()  # (.., 12, 12)
    assert torch.equal(covered | kept, torch.ones_like(kept))


def test_resnet12_regularisation_is_off_by_default_and_only_in_training() -> None:
    torch.manual_seed(0)
    plain = ResNet12(5, width=0.125)
    regular = ResNet12(5, width=0.125, drop_rate=0.1)
    regular.load_state_dict(plain.state_dict())
    x = torch.rand(6, 1, 28, 28)
    assert torch.equal(plain(x), plain(x))  # deterministic by default, training mode
    regular.eval()
    assert torch.allclose(regular(x), plain(x), atol=1e-6)  # eval: no dropout (BN: batch stats)
    regular.train()
    assert not torch.allclose(regular(x), plain(x), atol=1e-3)


# ----------------------------------------------------------------------------- MAML: exact meta-gradients


def _tiny(name: str) -> tuple[nn.Module, TaskBatch, Callable]:
    """A tiny float64 model of the zoo and a 2-task batch for it (loss_fn included)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    T, n = 2, 6  # tasks, examples per set
    if name == "mlp":
        model = models.MLP(1, (8, 8), 1)
        xs, xq = (torch.rand(T, n, 1, generator=g, dtype=DT) * 4 - 2 for _ in range(2))
        ys, yq = torch.sin(xs), torch.sin(xq)
        loss = F.mse_loss
    elif name == "conv4":
        model = models.Conv4(ways=3, hidden=4, image_size=16)
        xs, xq = (torch.rand(T, n, 1, 16, 16, generator=g, dtype=DT) for _ in range(2))
        ys, yq = (torch.arange(n).remainder(3).expand(T, n) for _ in range(2))
        loss = F.cross_entropy
    elif name == "resnet12":
        model = ResNet12(ways=3, width=0.0625)  # 4-10-20-40 channels
        xs, xq = (torch.rand(T, n, 1, 16, 16, generator=g, dtype=DT) for _ in range(2))
        ys, yq = (torch.arange(n).remainder(3).expand(T, n) for _ in range(2))
        loss = F.cross_entropy
    elif name == "transformer":
        model = TransformerClassifier(num_classes=3, vocab_size=7, d_model=8, nhead=2, num_layers=1, max_len=5)
        xs, xq = (torch.randint(0, 7, (T, n, 5), generator=g) for _ in range(2))
        ys, yq = (torch.randint(0, 3, (T, n), generator=g) for _ in range(2))
        loss = F.cross_entropy
    elif name == "lstm":
        model = LSTMRegressor(input_dim=1, hidden=5, output_dim=1)
        t = torch.linspace(0, 3, 6, dtype=DT)
        phase = torch.rand(T, 2 * n, 1, generator=g, dtype=DT) * 3
        seq = torch.sin(t + phase)  # (tasks, 2n, 6): a sinusoid's next value from 5 samples
        x, y = seq[..., :5, None], seq[..., 5:]
        xs, xq, ys, yq = x[:, :n], x[:, n:], y[:, :n], y[:, n:]
        loss = F.mse_loss
    else:
        raise AssertionError(name)
    return model.to(DT), TaskBatch(support=(xs, ys), query=(xq, yq)), loss


INNER = {
    "sgd": lambda: SGD(lr=0.1, momentum=0.5),
    "adafactor": lambda: Adafactor(lr=0.02),
}


@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("name", models.names())
def test_second_order_meta_gradient_matches_finite_differences(name: str, inner: str) -> None:
    model, batch, loss_fn = _tiny(name)
    # The default engine path: vmap where exact (LayerNorm and attention run through the
    # engine's exact ops and math attention kernel), the loop for nn.LSTM.
    maml = MAML(model, INNER[inner](), inner_steps=2, loss_fn=loss_fn)
    errors = fd_relative_errors(maml, batch, directions=3)
    assert max(errors) <= FD_TOL, errors


def test_resnet12_vmap_meta_gradient_equals_the_loop() -> None:
    model, batch, loss_fn = _tiny("resnet12")
    grads = []
    for vectorize in (False, True):
        maml = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=loss_fn, vectorize=vectorize)
        model.zero_grad()
        maml.meta_loss(batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- ResNet-12 on Omniglot


@pytest.fixture(scope="module")
def omniglot_val(
    omniglot_root: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Omniglot:
    # The same cache folder as tests/tasks (pytest's cache, kept between runs), so the
    # split is decoded once; a temporary folder when the cache plugin is off.
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("metaopt-omniglot")) if cache is not None else tmp_path_factory.mktemp("zoo-omniglot")
    return Omniglot(omniglot_root, ways=5, shots=1, queries=15, split="val", cache_dir=folder)


def test_resnet12_second_order_maml_step_on_omniglot_lowers_the_meta_loss(omniglot_val: Omniglot) -> None:
    batch = omniglot_val.sample(2, torch.Generator().manual_seed(0))  # 2 tasks, 5-way 1-shot
    assert batch.support[0].shape == (2, 5, 1, 28, 28) and batch.query[0].shape == (2, 75, 1, 28, 28)
    torch.manual_seed(0)
    model = ResNet12(ways=5, width=0.125)
    maml = MAML(model, SGD(lr=0.4), inner_steps=1)  # second order, vectorize="auto" (loop on CPU)
    outer = torch.optim.SGD(maml.parameters(), lr=0.05)
    out = maml.meta_loss(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.accuracy.shape == (2,)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())  # every parameter is trained
    outer.step()
    after = maml.meta_loss(batch, before=False).loss
    assert after < out.loss - 1e-4, (float(out.loss), float(after))


def test_resnet12_config_model_section_builds_through_the_registry() -> None:
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/omniglot_5w1s_resnet12.yaml").read_text())
    spec = dict(cfg["model"])
    net = models.get(spec.pop("name"), ways=cfg["task"]["ways"], **spec)
    assert isinstance(net, ResNet12) and net.head.out_features == 5
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
