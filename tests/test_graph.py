"""find_activations: which activation consumes each weight layer's output."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initlab._errors import InitlabError
from initlab._graph import WEIGHT_LAYERS, LayerLink, find_activations


def acts(model: nn.Module) -> dict[str, str | None]:
    """name -> 'relu' / 'leaky_relu(0.2)' / None, for compact assertions."""
    out = {}
    for name, link in find_activations(model).items():
        a = link.activation
        out[name] = None if a is None else (a.name if a.param is None else f"{a.name}({a.param:g})")
    return out


def test_weight_layers_cover_the_contract():
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Bilinear, nn.Embedding, nn.MultiheadAttention):
        assert issubclass(cls, WEIGHT_LAYERS)
    assert not issubclass(nn.LayerNorm, WEIGHT_LAYERS)


def test_mlp_sequential():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 8), nn.LeakyReLU(0.2),
                      nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3))
    links = find_activations(m)
    assert list(links) == ["0", "3", "5", "7"]
    assert acts(m) == {"0": "relu", "3": "leaky_relu(0.2)", "5": "sigmoid", "7": None}
    assert all(isinstance(v, LayerLink) and v.traced for v in links.values())
    assert links["0"].activation_node == "1"
    assert links["7"].readout and links["7"].activation_node is None
    assert links["0"].module is m[0]


def test_cnn_with_batchnorm_and_pooling_between():
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3), nn.MaxPool2d(2), nn.ELU(alpha=0.5),
        nn.Flatten(), nn.Dropout(), nn.Linear(8 * 4, 10),
    )
    links = find_activations(m)
    assert acts(m) == {"0": "relu", "3": "elu(0.5)", "8": None}
    assert links["0"].through == ("1",)
    assert links["3"].through == ("4",)


class ResBlock(nn.Module):
    def __init__(self, c: int = 4, downsample: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.short = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) if downsample else nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.short(x))


def test_residual_block():
    m = ResBlock(downsample=True)
    links = find_activations(m)
    assert acts(m) == {"conv1": "relu", "conv2": "relu", "short.0": "relu"}
    assert links["conv2"].through == ("bn2",)
    assert links["short.0"].through == ("short.1",)
    assert links["conv2"].activation_node == "relu"


def test_residual_add_with_nothing_after_is_a_readout():
    class Pre(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc(self.ln(x))

    assert acts(Pre()) == {"fc": None}


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.e, self.f, self.g, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.3)
        x = F.leaky_relu(self.b(x), negative_slope=0.1)
        x = torch.tanh(self.c(x))
        x = self.d(x).relu()
        x = F.gelu(self.e(x).view(-1, 4), approximate="tanh")
        x = F.relu(self.f(x), inplace=True)
        x = F.elu(self.g(x), alpha=2.0)
        return torch.softmax(self.h(x), dim=-1)


def test_functional_activations_and_parameters():
    m = Functional()
    links = find_activations(m)
    assert acts(m) == {"a": "leaky_relu(0.3)", "b": "leaky_relu(0.1)", "c": "tanh", "d": "relu",
                       "e": "gelu_tanh", "f": "relu", "g": "elu(2)", "h": None}
    assert links["a"].activation_node is None  # functional
    assert "softmax" in links["h"].note


def test_default_slope_of_functional_leaky_relu():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.leaky_relu(self.fc(x))

    assert acts(M()) == {"fc": "leaky_relu(0.01)"}


def test_activation_module_registered_before_layer_is_found_by_tracing():
    # registration order says fc1 -> (fc2): readout; the trace knows tanh consumes fc1.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()
            self.fc1 = nn.Linear(3, 3)
            self.fc2 = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    assert acts(M()) == {"fc1": "tanh", "fc2": None}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.act1 = nn.LeakyReLU(0.2)
        self.drop = nn.Dropout()
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 2)
        self.act3 = nn.Sigmoid()

    def forward(self, x):
        x = self.drop(self.act1(self.fc1(x)))
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            x = x * 2
        return self.act3(self.fc3(torch.tanh(self.fc2(x))))


def test_untraceable_model_falls_back_to_registration_order():
    links = find_activations(Untraceable())
    assert {k: v.traced for k, v in links.items()} == {"fc1": False, "fc2": False, "fc3": False}
    # functional tanh is invisible in module order; fc2 sees fc3 next and is a readout
    assert acts(Untraceable()) == {"fc1": "leaky_relu(0.2)", "fc2": None, "fc3": "sigmoid"}
    assert "tracing failed" in links["fc1"].note
    # the fallback follows registration order, not data flow: dropout is registered after act1
    assert links["fc1"].through == ()


def test_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0)
    links = find_activations(layer)
    assert acts(layer) == {"self_attn": None, "self_attn.out_proj": None, "linear1": "relu", "linear2": None}
    assert all(v.traced for v in links.values())
    assert links["linear2"].through == ("dropout2", "norm2")
    gelu = nn.TransformerEncoderLayer(16, 4, 32, activation="gelu", norm_first=True)
    assert acts(gelu)["linear1"] == "gelu"
    assert find_activations(gelu)["linear2"].through == ("dropout2",)
    mod = nn.TransformerEncoderLayer(16, 4, 32, activation=nn.LeakyReLU(0.3))
    links = find_activations(mod)
    assert acts(mod)["linear1"] == "leaky_relu(0.3)"
    assert links["linear1"].activation_node == "activation"


def test_transformer_inside_a_traced_model():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(16, 4, 32, activation="gelu", batch_first=True), 2,
                enable_nested_tensor=False)
            self.head = nn.Linear(16, 50)

        def forward(self, tokens):
            return self.head(self.enc(self.emb(tokens)))

    links = find_activations(LM())
    a = {k: (v.activation.name if v.activation else None) for k, v in links.items()}
    assert a["emb"] is None and a["head"] is None
    assert a["enc.layers.0.linear1"] == "gelu" and a["enc.layers.1.linear1"] == "gelu"
    assert a["enc.layers.1.linear2"] is None
    assert "enc.layers.1.self_attn.out_proj" in links
    assert all(v.traced for v in links.values())


def test_multihead_attention_output_followed_and_weights_ignored():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y, w = self.attn(x, x, x)
            n = y.size(0)  # a shape query carries no data
            return self.fc(F.silu(y)).reshape(n, -1)

    m = M()
    links = find_activations(m)
    assert acts(m) == {"attn": None, "attn.out_proj": "silu", "fc": None}
    assert links["attn"].module is m.attn and links["attn.out_proj"].module is m.attn.out_proj


def test_disagreeing_consumers_pick_the_first_and_say_so():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            return torch.cat([torch.sigmoid(h), F.relu(h)], -1)  # two branches (a sum would be one expression)

    link = find_activations(M())["fc"]
    assert link.activation.name == "sigmoid"
    assert "relu" in link.note and "first" in link.note


def test_other_layer_types():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.bil = nn.Bilinear(4, 4, 4)
            self.up = nn.ConvTranspose1d(4, 4, 3)
            self.prelu = nn.PReLU()
            self.unused = nn.Linear(4, 4)

        def forward(self, idx):
            e = self.emb(idx)  # (B, L, 4)
            b = torch.tanh(self.bil(e, e))
            return self.prelu(self.up(b.transpose(1, 2)))

    links = find_activations(M())
    assert acts(M()) == {"emb": None, "bil": "tanh", "up": "prelu(0.25)", "unused": None}
    assert "not called" in links["unused"].note


def test_meta_model_is_traced():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 4), nn.GELU())
    assert acts(m) == {"0": "prelu(0.25)", "2": "gelu"}


def test_single_layer_root_and_errors():
    links = find_activations(nn.Linear(3, 2))
    assert list(links) == [""] and links[""].activation is None
    assert find_activations(nn.Sequential(nn.ReLU())) == {}
    with pytest.raises(InitlabError, match="nn.Module"):
        find_activations(lambda x: x)  # type: ignore[arg-type]
