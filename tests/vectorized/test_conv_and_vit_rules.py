"""The Conv2d rule (the k groups as the convolution's own groups) and ViTEmbeddings' per-row rule, against the
plain-PyTorch mSAM reference (tests/reference.py), in float64, with even and uneven micro-batches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import msam_gradient

from hf_msam import MicroBatchSAM
from hf_msam.vectorized import Vectorizer


class ConvNet(nn.Module):
    """Strided, padded, biased; grouped and dilated without bias; a Linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, pixel_values, labels):
        h = self.b(torch.tanh(self.a(pixel_values)))
        logits = self.head(torch.tanh(h).flatten(1))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def vectorized_gradient(model, batch, micro_batch_size, rho):
    sam = MicroBatchSAM(model, rho=rho, micro_batch_size=micro_batch_size, vectorize="on")
    sam.backward(batch, lambda mb: model(**mb)["loss"])
    assert sam.path == "vectorized"
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("micro_batch_size", [2, 3])  # 7 rows: 2,2,2,1 and 3,3,1
def test_conv2d_rule_equals_the_reference(micro_batch_size):
    torch.manual_seed(0)
    model = ConvNet().double()
    assert [type(m).__name__ for _, m, rule in Vectorizer(model, list(model.parameters())).covered() if rule is None] == []
    batch = {"pixel_values": torch.randn(7, 3, 8, 8, dtype=torch.float64), "labels": torch.randint(0, 3, (7,))}
    expected = msam_gradient(model, batch, micro_batch_size, rho=0.1)
    got = vectorized_gradient(model, batch, micro_batch_size, rho=0.1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config).double()


def test_vit_embeddings_per_row_equal_the_reference():
    model = tiny_vit()
    assert Vectorizer(model, list(model.parameters())).fallback_modules() == []
    batch = {"pixel_values": torch.randn(5, 3, 8, 8, dtype=torch.float64), "labels": torch.randint(0, 3, (5,))}
    expected = msam_gradient(model, batch, 2, rho=0.1)
    got = vectorized_gradient(model, batch, 2, rho=0.1)
    names = [n for n, _ in model.named_parameters()]
    for name, g, e in zip(names, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_interpolated_positions_fall_back_with_the_reason(caplog):
    import logging

    model = tiny_vit()
    batch = {"pixel_values": torch.randn(4, 3, 12, 12, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 0])}
    sam = MicroBatchSAM(model, micro_batch_size=2, vectorize="auto")
    with caplog.at_level(logging.INFO, logger="hf_msam"):
        sam.backward(batch, lambda mb: model(**mb, interpolate_pos_encoding=True)["loss"])
    assert sam.path == "sequential" and "vit.embeddings (ViTEmbeddings) with each row's own parameters failed" in sam.path_reason
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = msam_gradient(model, batch, 2, rho=0.05, loss_of=lambda m, b: m(**b, interpolate_pos_encoding=True)["loss"])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
