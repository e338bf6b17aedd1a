"""Every backbone family beyond ResNet/VGG/DenseNet, and a user's own model: the core's per-family checks.

Blocks reproduce torchvision's forward; routed answers equal single-sample answers; unreachable
thresholds give the plain backbone; all-exit-at-0 never runs later segments and costs what the
FLOP counter sees; the artifact round-trips; BN folding keeps answers: one test per family runs them
all on one model, built once for the module. Each family is torchvision's own class at a tiny
width and depth (torchvision's constructors take the settings), or a registry entry that is already
small, at 32 px with random weights, on one torch thread; one test runs ViT-B/16 at its native 224 px.
"""
import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.regnet import BlockParams

from branched import families
from branched.artifact import load_model, save_model
from branched.backbones import available_backbones, build_backbone, load_backbone_weights
from branched.blocks import CutError, cut_model, find_blocks
from branched.cost import count_flops, flop_counter
from branched.build.placement import exit_specs, place_exits
from branched.config import ModelConfig
from branched.exits import ExitBranch, ExitSpec
from branched.model import BranchedModel
from branched.preprocess import Preprocessor
from branched.serving import Predictor

from helpers import assert_optimizing_keeps_answers, median_thresholds, png

# One member of every family at 32 px: registry entries that are already small (cifar_vit_micro: torchvision's
# VisionTransformer, 4 x 32; cifar_mobilenet_v3_small: the CIFAR stem), torchvision's classes at tiny settings
# (registered below, cut by the same tracing as their registry names), and a user's own models.
FAMILIES = ["cifar_vit_micro", "tiny_mobilenet_v2", "cifar_mobilenet_v3_small", "tiny_efficientnet", "tiny_regnet_y",
            "tiny_convnext", "tiny_swin", "tinynet", "hybridnet"]
SIZE = 32


# ------------------------------------------------------------------------------------- a user's own models
class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyNet(nn.Module):
    """Conv stages with glue code between them in the forward: blocks are found by tracing."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = Residual(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = Residual(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class HybridNet(nn.Module):
    """A conv stem, then torch's own transformer layers on tokens: blocks named by the user."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, 2, 64, batch_first=True) for _ in range(3))
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.norm(x.mean(1)))


class SkipNet(TinyNet):
    """A skip from the stem to the head: no cut after stage1 can be made."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        x = self.stage2(self.down(self.stage1(s)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) + s.mean((2, 3)).repeat(1, 2))


class BranchyNet(TinyNet):
    """Data-dependent control flow in the top-level forward: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(-x if x.sum() > 0 else x)


class UntraceableBlock(Residual):
    """A block with BatchNorm whose own forward cannot be traced (BN folding must skip it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if y.shape[-1] % 2 == 0 or float(y.mean()) > -1e9 else -y


class OddNet(TinyNet):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.stage1 = UntraceableBlock(8)


families.register_backbone("tinynet", TinyNet, input_size=32, replace=True)
families.register_backbone("hybridnet", HybridNet, input_size=32, replace=True,
                           blocks=["stem", "layers.0", "layers.1", "layers.2"])
families.register_backbone("oddnet", OddNet, input_size=32, replace=True,
                           blocks=["stem", "stage1", "down", "stage2"])

# torchvision's classes with their own settings made tiny: the modules, forwards and dotted names of
# mobilenet_v2, efficientnet_b0, regnet_y_400mf, convnext_tiny and swin_t, at a few thousand parameters.
TINY = {
    "tiny_mobilenet_v2": (lambda n: models.mobilenet_v2(
        num_classes=n, width_mult=0.25, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]]),
        "nchw"),
    "tiny_efficientnet": (lambda n: models.EfficientNet(
        [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(6, 3, 2, 8, 16, 2), MBConvConfig(6, 5, 2, 16, 24, 1)],
        dropout=0.2, num_classes=n), "nchw"),
    "tiny_regnet_y": (lambda n: models.RegNet(BlockParams.from_init_params(
        depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25), num_classes=n, stem_width=8), "nchw"),
    # layer_scale 0.5 (torchvision's default 1e-6 makes every block next to the identity at random weights)
    "tiny_convnext": (lambda n: models.ConvNeXt(
        [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], layer_scale=0.5,
        num_classes=n), "nchw"),
    # windows of 4 on an 8x8 map: shifted windows and their attention mask in stage 1, a window = the map later
    "tiny_swin": (lambda n: models.SwinTransformer(
        [4, 4], 16, [1, 2, 1], [1, 2, 4], [4, 4], stochastic_depth_prob=0.0, num_classes=n), "nhwc"),
}
for _name, (_factory, _layout) in TINY.items():
    families.register_backbone(_name, _factory, input_size=32, layout=_layout, replace=True)


def user_factory(num_classes: int) -> nn.Module:
    """What an installed package names in its ``branched.backbones`` entry point."""
    return TinyNet(num_classes)


# ---------------------------------------------------------------------------------------------- helpers
def randomize(model: nn.Module, size: int = 32) -> nn.Module:
    """No all-zero weights (ViT's head starts at 0), and BatchNorm statistics measured on random
    images, then perturbed: BN is not the identity, and deep random nets keep input-dependent
    features (with arbitrary statistics MobileNet's exit scores differ by 1e-7 across inputs)."""
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if bns:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average
            model.train()
            for _ in range(2):
                model(torch.randn(16, 3, size, size, generator=g))
            model.eval()
            for m in bns:
                m.momentum = 0.1
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
    return model.eval()


def make(name: str, size: int, n_exits: int = 2, **kw) -> BranchedModel:
    bb = build_backbone(name, 10)
    randomize(bb.model, size)
    cfg = ModelConfig(backbone=name, num_classes=10, input_size=size, exits=place_exits(bb, size, n_exits, **kw))
    model = BranchedModel(cfg, bb).eval()
    model.__dict__["source"] = bb.model.eval()  # a plain attribute, not a registered submodule
    return model


def assert_logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Float noise between batch shapes or BN folding, relative to the logits' scale: random deep nets
    (EfficientNet) reach logits of ~10, where reordered sums differ by a few 1e-3."""
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(b.abs().max())))


@functools.cache
def built(name: str) -> BranchedModel:
    """The module's one model of family ``name`` (two exits, 32 px). Tests that use it leave it as they found it."""
    return make(name, SIZE)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models of a few thousand parameters gain nothing from a second intra-op thread, and on a shared 2-core
    machine a parallel region waits for a descheduled peer (beside a one-core benchmark this module took
    100 s on two threads, 18 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved(model: BranchedModel, directory: str, thresholds: list[float]) -> str:
    """``model`` saved with ``thresholds`` as its own; the shared model keeps its config."""
    before = model.config.thresholds
    model.config.thresholds = thresholds
    try:
        return save_model(model, directory)
    finally:
        model.config.thresholds = before


def run_hooked(model: BranchedModel, modules, x: torch.Tensor, thresholds: list[float]):
    """``routed_forward`` under the FLOP counter, with the indices of ``modules`` that ran, in order."""
    ran = []
    hooks = [m.register_forward_hook(lambda *a, k=k: ran.append(k)) for k, m in enumerate(modules)]
    counter = flop_counter()
    try:
        with counter:
            out = model.routed_forward(x, thresholds)
    finally:
        for h in hooks:
            h.remove()
    return out, ran, counter.get_total_flops()


# -------------------------------------------------------------------------------------- per-family checks
@pytest.mark.parametrize("name", FAMILIES)
def test_family(name, tmp_path):
    """Every check the families share, on one model: forward, batch = single, exits off, all at exit 0, cost
    table, artifact round trip, and BN folding (on the loaded copy)."""
    model = built(name)
    x = torch.randn(12, 3, SIZE, SIZE)
    off, first = [math.inf] * (model.num_exits - 1), [0.0] * (model.num_exits - 1)

    # The blocks and the head in order are the torchvision (or the user's) forward.
    with torch.no_grad():
        plain = model.source(x)
        torch.testing.assert_close(model.backbone_forward(x), plain)

    # Routed answers in a batch equal single-sample answers.
    thr = median_thresholds(model, x)
    batch = model.routed_forward(x, thr)
    assert len(set(batch.exit_index.tolist())) > 1, "thresholds should spread samples over exits"
    for i in range(len(x)):
        alone = model.routed_forward(x[i:i + 1], thr)
        assert alone.exit_index.item() == batch.exit_index[i].item(), f"sample {i}: exit"
        assert alone.class_index.item() == batch.class_index[i].item(), f"sample {i}: class"
        assert_logits_close(alone.logits[0], batch.logits[i])
        assert alone.flops.item() == batch.flops[i].item(), f"sample {i}: flops"

    # Every exit off: the plain backbone's answers, no side head runs, exactly its FLOPs (attention included).
    out, heads, flops = run_hooked(model, model.exits[:-1], x[:5], off)
    assert (out.exit_index == model.num_exits - 1).all()
    torch.testing.assert_close(out.logits, plain[:5])
    assert heads == [], "an exit that is off must not run its head"
    assert (out.flops == model.cost.backbone_flops).all()
    assert flops == 5 * model.cost.backbone_flops

    # Every sample out at exit 0: later segments never run, and the counter sees exit 0's cost only.
    out, segments, flops = run_hooked(model, model.segments, x[:4], first)
    assert (out.exit_index == 0).all()
    assert segments == [0]
    assert flops == 4 * model.cost.exit_cost(0)

    # The cost table is the FLOP counter's view of the torchvision model.
    with torch.no_grad():
        assert model.cost.backbone_flops == count_flops(model.source, torch.zeros(1, 3, SIZE, SIZE))
    fractions = model.cost.exit_cost_fractions()
    assert fractions == sorted(fractions) and fractions[0] < 1 < fractions[-1]

    # Artifact round trip, thresholds included.
    loaded = load_model(saved(model, str(tmp_path / "m"), thr))
    after = loaded.routed_forward(x)
    assert loaded.config.thresholds == thr
    assert torch.equal(batch.exit_index, after.exit_index)
    assert torch.equal(batch.logits, after.logits)
    assert loaded.cost.to_dict() == model.cost.to_dict()
    assert [s.names for s in loaded.segments] == [s.names for s in model.segments]

    # BN folding (and channels-last on conv maps) keeps the answers; done on the loaded copy.
    loaded.optimize_for_inference()
    folded = loaded.routed_forward(x, thr)
    assert torch.equal(batch.exit_index, folded.exit_index)
    assert_logits_close(batch.logits, folded.logits)
    conv_maps = all(lay == "nchw" for lay in loaded.feature_layouts)
    assert loaded.memory_format == (torch.channels_last if conv_maps else torch.contiguous_format)


# ---------------------------------------------------------------------------------- blocks and layouts
def test_blocks_are_the_torchvision_modules_by_their_dotted_names():
    vit = build_backbone("cifar_vit_micro", 10)
    assert vit.block_names == ["stem"] + [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert vit.blocks[2][1] is vit.model.encoder.layers.encoder_layer_1
    mob = build_backbone("mobilenet_v3_small", 10)
    assert mob.block_names == [f"features.{i}" for i in range(13)]
    assert mob.blocks[3][1] is mob.model.features[3]
    assert {families.family(n).layout for n in ("swin_t", "swin_s", "swin_b", "swin_v2_t")} == {"nhwc"}
    swin = build_backbone("tiny_swin", 10)  # swin_t's modules at depths (1, 2, 1): swin_t's names
    assert swin.block_names[:5] == ["features.0", "features.1.0", "features.2", "features.3.0", "features.3.1"]
    eff = build_backbone("efficientnet_b0", 10)
    assert eff.block_names[:4] == ["features.0", "features.1.0", "features.2.0", "features.2.1"]
    assert {"vit_b_16", "swin_v2_t", "efficientnet_b7", "regnet_x_800mf", "convnext_base", "mobilenet_v2",
            "cifar_mobilenet_v3_large", "cifar_vit_tiny", "resnet18"} <= set(available_backbones())


def test_exit_heads_follow_the_feature_layout():
    vit, swin = built("cifar_vit_micro"), built("tiny_swin")
    assert vit.feature_layouts == ["tokens"] * 3 and swin.feature_layouts == ["nhwc"] * 3
    assert [e.kind for e in vit.config.exits] == ["mlp", "mlp"]
    assert built("tiny_mobilenet_v2").config.exits[0].kind == "conv"
    ex = vit.exits[0]
    assert isinstance(ex.norm, nn.LayerNorm) and ex.classifier.in_features == 32
    tokens = torch.randn(2, 17, 32)
    cls = ExitBranch(32, 10, "linear", layout="tokens", pool="cls")
    out = cls(tokens)
    assert out.logits.shape == (2, 10) and out.confidence.shape == (2,)
    torch.testing.assert_close(out.logits, cls.classifier(cls.norm(tokens[:, 0])))
    avg = ExitBranch(32, 10, "linear", layout="tokens")
    torch.testing.assert_close(avg(tokens).logits, avg.classifier(avg.norm(tokens.mean(1))))
    maps = torch.randn(2, 4, 4, 24)
    nhwc = ExitBranch(24, 10, "mlp", depth=1, layout="nhwc")
    torch.testing.assert_close(nhwc(maps).logits, nhwc.classifier(nhwc.mlp(nhwc.norm(maps.mean((1, 2))))))
    with pytest.raises(ValueError, match="'conv' exit needs conv feature maps.*use kind 'mlp'"):
        ExitBranch(32, 10, "conv", layout="tokens")
    with pytest.raises(ValueError, match="first token"):
        ExitBranch(32, 10, "linear", layout="nchw", pool="cls")
    with pytest.raises(ValueError, match="'sdn' exit needs conv feature maps"):
        ExitBranch(32, 10, "sdn", layout="nhwc")
    # The pool of a linear or mlp exit has no weights: it is the exit's reduce, so exit training caches
    # [B, D] per exit rather than the whole token sequence.
    assert ex.reduce(tokens).shape == (2, 32)
    torch.testing.assert_close(ex.head(ex.reduce(tokens)).logits, ex(tokens).logits)


def test_class_token_exits_route_and_round_trip(tmp_path):
    bb = build_backbone("cifar_vit_micro", 10)
    randomize(bb.model)
    specs = exit_specs(bb, 32, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"], pool="cls")
    assert [(s.kind, s.pool) for s in specs] == [("mlp", "cls")] * 2
    model = BranchedModel(ModelConfig(backbone="cifar_vit_micro", num_classes=10, exits=specs), bb).eval()
    x = torch.randn(6, 3, 32, 32)
    loaded = load_model(save_model(model, str(tmp_path / "vit")))
    thr = median_thresholds(model, x)
    assert torch.equal(model.routed_forward(x, thr).logits, loaded.routed_forward(x, thr).logits)


def test_vit_b_16_at_its_native_size():
    """ViT-B/16 as torchvision builds it: blocks == forward at 224 px, and FLOPs with attention counted."""
    bb = build_backbone("vit_b_16", 1000)
    assert bb.default_input_size == 224 and len(bb.blocks) == 13
    randomize(bb.model, 224)
    x = torch.randn(1, 3, 224, 224)
    counter, plain = flop_counter(), torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad():  # two forwards: torchvision's under branched's counter, the blocks under torch's own
        with counter:
            expected = bb.model(x)
        with plain:
            h = x
            for _, block in bb.blocks:
                h = block(h)
            got = bb.head(h)
    torch.testing.assert_close(got, expected)
    flops = counter.get_total_flops()
    # torchvision's model card: 17.56 GMACs (multiply-adds); the counter counts 2 FLOPs per MAC.
    assert abs(flops / 2e9 - 17.564) < 0.02
    # Without the attention formulas the torch counter misses the attention (and, under no_grad,
    # nn.MultiheadAttention's projections): a third of the model.
    assert plain.get_total_flops() < 0.7 * flops


def test_attention_flops_are_counted_the_same_on_every_path():
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    mha = models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                                   mlp_dim=64).encoder.layers[0].eval()
    x = torch.randn(2, 17, 32)
    b, n, e, h, f = 2, 17, 32, 2, 64
    expected = 2 * b * n * e * 3 * e + 2 * 2 * b * h * n * n * (e // h) + 2 * b * n * e * e + 2 * 2 * b * n * e * f
    for module in (layer, mha):
        for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):  # slow path, fast paths
            with mode():
                counter = flop_counter()
                with counter:
                    module(x)
            assert counter.get_total_flops() == expected, (type(module).__name__, mode.__name__)


# ------------------------------------------------------------------------------------ a user's own model
def test_find_blocks_by_tracing():
    assert find_blocks(TinyNet(), 32) == ["stem", "stage1", "down", "stage2"]
    blocks, head = cut_model(TinyNet().eval(), None, 32)
    assert [n for n, _ in blocks] == ["stem", "stage1", "down", "stage2"]


@pytest.mark.parametrize("model, blocks, match", [
    (SkipNet(), ["stem", "stage1", "down", "stage2"], r"cannot cut SkipNet after 'stage1': the output of 'stem'"),
    (BranchyNet(), None, "torch.fx cannot trace its forward"),
    (BranchyNet(), ["stem", "stage1"], "cannot trace BranchyNet.forward outside the blocks"),
    (TinyNet(), ["stage1", "stem"], "in the order the forward runs them"),
    (TinyNet(), ["stage1", "stage1.conv1"], "lies inside block 'stage1'"),
    (TinyNet(), ["stem", "nope"], "has no module 'nope'"),
    (TinyNet(), ["stem", "stage1", "down", "stage2", "fc"], "nothing follows the last block 'fc'"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)), None, r"found 0 block\(s\)"),
])
def test_a_model_that_cannot_be_cut_says_why_in_one_line(model, blocks, match):
    with pytest.raises(CutError, match=match) as info:
        cut_model(model.eval(), blocks, 32)
    assert "\n" not in str(info.value)


def test_untraceable_torch_module_holding_blocks_says_what_to_name():
    class Wrapped(HybridNet):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoder(self.layers[0], 2, enable_nested_tensor=False)
            del self.layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.encoder(self.stem(x).flatten(2).transpose(1, 2)).mean(1)))

    with pytest.raises(CutError, match="cannot trace 'encoder' .*name 'encoder' as one block instead"):
        cut_model(Wrapped().eval(), ["stem", "encoder.layers.0", "encoder.layers.1"], 32)
    assert [n for n, _ in cut_model(Wrapped().eval(), ["stem", "encoder"], 32)[0]] == ["stem", "encoder"]


def test_bn_folding_skips_blocks_it_cannot_trace():
    model = make("oddnet", 32)
    assert_optimizing_keeps_answers(model, torch.randn(8, 3, 32, 32))
    blocks = [b for seg in model.segments for b in seg.blocks]
    assert any(isinstance(b, UntraceableBlock) for b in blocks), "the untraceable block is kept as it was"
    assert not any(isinstance(m, nn.BatchNorm2d) for b in blocks if not isinstance(b, UntraceableBlock)
                   for m in b.modules()), "every other block is folded"


def test_user_model_from_an_entry_point(monkeypatch, tmp_path):
    from importlib.metadata import EntryPoint

    eps = [EntryPoint("entrynet", "test_families:user_factory", families.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(families, "entry_points", lambda group: eps if group == families.ENTRY_POINT_GROUP else [])
    monkeypatch.delitem(families._REGISTRY, "entrynet", raising=False)
    assert "entrynet" in available_backbones()
    bb = build_backbone("entrynet", 10)
    assert bb.block_names == ["stem", "stage1", "down", "stage2"]
    model = BranchedModel(ModelConfig(backbone="entrynet", num_classes=10, exits=[ExitSpec("stage1")]), bb).eval()
    x = torch.randn(3, 3, 32, 32)
    monkeypatch.delitem(families._REGISTRY, "entrynet")  # a fresh process: only the entry point knows it
    loaded = load_model(save_model(model, str(tmp_path / "m")))
    assert torch.equal(loaded.routed_forward(x).logits, model.routed_forward(x).logits)


def test_unknown_backbone_names_the_ways_to_register():
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'.*register_backbone.*branched.backbones"):
        build_backbone("alexnet", 10)
    with pytest.raises(ValueError, match="taken"):
        families.register_backbone("resnet18", TinyNet)


def test_wrong_input_size_is_one_clear_error():
    bb = build_backbone("cifar_vit_micro", 10)
    with pytest.raises(ValueError, match="does not run at input size 64.*its own size is 32"):
        BranchedModel(ModelConfig(backbone="cifar_vit_micro", num_classes=10, input_size=64), bb)


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", ["cifar_vit_micro", "mobilenet_v3_small"])
def test_weights_from_a_local_checkpoint(name, tmp_path):
    source = randomize(families.family(name).factory(10))
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    bb = load_backbone_weights(name, 10, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model.eval()(x), source.eval()(x))


def test_weights_from_the_torch_hub_cache_and_nothing_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    spec = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    with pytest.raises(FileNotFoundError, match="not in the local cache.*nothing is downloaded"):
        load_backbone_weights("mobilenet_v3_small", 1000, spec)
    source = randomize(models.mobilenet_v3_small(weights=None))
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    bb = load_backbone_weights("mobilenet_v3_small", 1000, spec)
    assert all(torch.equal(a, b) for a, b in zip(bb.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit mobilenet_v3_small with 10 classes"):
        load_backbone_weights("mobilenet_v3_small", 10, spec)


def test_old_torchvision_densenet_keys_load(tmp_path):
    """torchvision's densenet121 file predates its module names ("denselayer1.norm.1.weight")."""
    source = randomize(models.densenet121(weights=None, num_classes=10))
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    bb = load_backbone_weights("densenet121", 10, str(tmp_path / "densenet121-a639ec97.pth"))
    loaded = bb.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items()
               if not k.endswith("num_batches_tracked"))  # not in the old file


# ------------------------------------------------------------------- served as they are (no per-family code)
@pytest.mark.parametrize("name", ["cifar_vit_micro", "cifar_mobilenet_v3_small"])
def test_served_as_they_are(name, tmp_path):
    """The TorchServe handler answers through Predictor; Ray's replicas run StageRunner.run on
    keep_stages copies (one stage, then two in one replica). Both give the in-process answers for a
    ViT and a MobileNet, with no per-family code."""
    model = built(name)
    requests = [(png(i), {}) for i in range(6)]
    x = torch.stack([Preprocessor.for_config(model.config).from_bytes(r[0]) for r in requests])
    thresholds = median_thresholds(model, x)
    directory = saved(model, str(tmp_path / name), thresholds)
    answers = Predictor(directory).answer_batch(requests)
    expected = model.routed_forward(x, thresholds).answers(model.config.class_names)
    assert [a["exit"] for a in answers] == [e["exit"] for e in expected]
    assert len({a["exit"] for a in answers}) > 1
    assert [a["class_index"] for a in answers] == [e["class_index"] for e in expected]

    ray_stages = pytest.importorskip("ray_app.stages")
    from ray_app.batching import Samples

    runners = []
    for group in ([0], [1, 2]):  # a replica with one stage, then one that hosts the next two
        runner = ray_stages.StageRunner.__new__(ray_stages.StageRunner)  # no Ray metrics outside a replica
        runner.stages, runner.device, runner.busy_s = group, torch.device("cpu"), 0.0
        runner.model = load_model(directory).keep_stages(group).optimize_for_inference()
        runner._count = lambda *a: None
        runners.append(runner)
    thr = torch.tensor(thresholds).expand(len(x), -1)
    batch, positions, got = Samples(x, thr), list(range(len(x))), [None] * len(x)
    for runner in runners:
        results, survivors = runner.run(batch)
        for i, r in enumerate(results):
            if r is not None:
                got[positions[i]] = r
        if survivors is None:
            break
        positions = [positions[i] for i in survivors[0]]
        batch = survivors[1]
    assert [g["exit"] for g in got] == [a["exit"] for a in answers]
    assert [g["class_index"] for g in got] == [a["class_index"] for a in answers]


# ------------------------------------------------------------------------------ bench: an exit mix by percentile
def test_percentile_thresholds_give_the_asked_exit_mix():
    from branched.cli import parse_bench_thresholds
    from branched.build.evaluate import percentile_thresholds

    assert parse_bench_thresholds("q20, 0.5,inf,q100") == ["q20", 0.5, math.inf, "q100"]
    model = make("cifar_vit_micro", 32, n_exits=3)
    x = torch.randn(100, 3, 32, 32)
    thr = percentile_thresholds(model, x, parse_bench_thresholds("q20,q50,q50"))
    rates = torch.bincount(model.routed_forward(x, thr).exit_index, minlength=4).tolist()
    assert rates == [80, 10, 5, 5]
    assert percentile_thresholds(model, x, ["q20", math.inf, 0.3])[1:] == [math.inf, 0.3]


def test_bench_splits_its_ideal_into_segment_times_and_routing():
    from branched.build.evaluate import bench

    model = make("cifar_vit_micro", 32, n_exits=3)
    x = torch.randn(32, 3, 32, 32)
    plain = bench(model, x, 16, [math.inf] * 3, rounds=1)
    assert plain["time_ideal_speedup"] == pytest.approx(1.0)  # nothing exits: every segment runs for every sample
    shares = plain["segment_time_shares"]
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0) and min(shares) > 0
    assert sum(plain["segment_flops_shares"]) == pytest.approx(1.0)
    first = bench(model, x, 16, [0.0, 0.0, 0.0], rounds=1)  # all leave at exit 0: only segment 0 counts
    assert first["time_ideal_speedup"] == pytest.approx(1.0 / first["segment_time_shares"][0])
    assert first["routing_efficiency"] == pytest.approx(first["measured_speedup"] / first["time_ideal_speedup"])
