"""sentence-transformers' trainer with `MSAMMixin`, on a tiny BERT built from a config (no network), against plain
PyTorch references computed here (float64, dropout off, SGD, one step):

- MultipleNegativesRankingLoss with micro-batches: the logged loss and the descent are the whole batch's, with all
  in-batch negatives, each micro-batch's rows embedded at its own w + e_j (e_j from the micro-batch's part of the
  batch's gradient), not the micro-batches' own losses (which see only their own negatives);
- SoftmaxLoss: plain mSAM over micro-batches, the loss's classifier perturbed with the encoder;
- CachedMultipleNegativesRankingLoss (its own backward) refused at start-up; rho = 0 bitwise plain."""

import dataclasses
import math

import pytest
import torch
from conftest import VOCAB
from torch.func import functional_call

pytest.importorskip("sentence_transformers")
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, models  # noqa: E402

try:  # sentence-transformers >= 6.3 (its old path, sentence_transformers.losses, warns there)
    from sentence_transformers.sentence_transformer import losses
except ImportError:  # older releases
    from sentence_transformers import losses
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizerFast  # noqa: E402

from hf_msam import MSAMArguments, MSAMMixin  # noqa: E402

RHO, LR, SCALE = 0.05, 0.1, 20.0  # SCALE: MultipleNegativesRankingLoss's default


@dataclasses.dataclass
class Args(MSAMArguments, SentenceTransformerTrainingArguments):
    pass


class Trainer(MSAMMixin, SentenceTransformerTrainer):
    """Records the batches it trains on (their order decides the micro-batches)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = [*getattr(self, "batches", []), {k: v for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-st")
    BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, model_max_length=32).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    return path


def sentence_model(encoder_dir):
    model = SentenceTransformer(modules=[models.Transformer(str(encoder_dir)), models.Pooling(16, "mean")], device="cpu")
    return model.double()


def pairs(n=8):
    words = VOCAB[7:]
    return {"anchor": [f"the {words[i]} movie" for i in range(n)],
            "positive": [f"a film {words[i]} and {words[(i + 3) % len(words)]}" for i in range(n)]}


def train(tmp_path, model, loss, data, **kwargs):
    settings = dict(per_device_train_batch_size=8, max_steps=1, report_to="none", use_cpu=True, logging_steps=1,
                    learning_rate=LR, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, msam_rho=RHO,
                    save_strategy="no")
    args = Args(str(tmp_path / "out"), **{**settings, **kwargs})
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(data), loss=loss)
    trainer.train()
    return trainer


def columns(batch):
    """The recorded batch's (anchor, positive, ...) features, by column prefix."""
    prefixes = [k[: -len("input_ids")] for k in batch if k.endswith("input_ids")]  # in the dataset's column order
    return [{k[len(p):]: v for k, v in batch.items() if k.startswith(p) and isinstance(v, torch.Tensor)} for p in prefixes]


def embed(model, params, features):
    return functional_call(model, params, (dict(features),))["sentence_embedding"]


def mnrl(anchors, positives):
    """MultipleNegativesRankingLoss from its definition: cross-entropy of scaled cosine similarities, the i-th positive
    the target of the i-th anchor, every other positive of the batch a negative."""
    scores = SCALE * torch.nn.functional.normalize(anchors, dim=-1) @ torch.nn.functional.normalize(positives, dim=-1).T
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(anchors)))


def rows(features, sl):
    return {k: v[sl] for k, v in features.items()}


def sam(g):
    norm = torch.sqrt(sum((t * t).sum() for t in g.values()))
    return {k: RHO * t / (norm + 1e-12) for k, t in g.items()}


def test_in_batch_negatives_keep_the_whole_batch(tmp_path, encoder_dir):
    model = sentence_model(encoder_dir)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = train(tmp_path, model, losses.MultipleNegativesRankingLoss(model), pairs(), msam_micro_batch_size=4)
    anchors, positives = columns(trainer.batches[0])
    halves = [slice(0, 4), slice(4, 8)]

    def loss_at(points):
        """The whole batch's loss, micro-batch j's rows embedded at points[j] (a dict of parameters)."""
        a = torch.cat([embed(model, p, rows(anchors, s)) for p, s in zip(points, halves)])
        b = torch.cat([embed(model, p, rows(positives, s)) for p, s in zip(points, halves)])
        return mnrl(a, b)

    w = {k: v.clone().requires_grad_() for k, v in w0.items()}
    clean = loss_at([w, w])
    e = []
    for j in range(2):  # g_j: the batch's gradient through micro-batch j's rows only, over c_j = 1/2
        points = [w if i == j else {k: v.detach() for k, v in w.items()} for i in range(2)]
        part = torch.autograd.grad(loss_at(points), list(w.values()), allow_unused=True, materialize_grads=True)
        e.append(sam({k: 2 * t for k, t in zip(w, part)}))
    perturbed = loss_at([{k: w[k] + e[j][k] for k in w} for j in range(2)])
    descent = torch.autograd.grad(perturbed, list(w.values()), allow_unused=True, materialize_grads=True)
    expected = {k: w0[k] - LR * d for k, d in zip(w, descent)}

    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(clean.item(), rel=1e-6)  # the whole batch's, all 7 negatives per anchor
    assert log["msam/perturbed_loss"] == pytest.approx(perturbed.item(), rel=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-9, atol=1e-12)

    # What the micro-batches' own losses would have given (3 negatives per anchor): something else.
    own = sum(mnrl(embed(model, w0, rows(anchors, s)), embed(model, w0, rows(positives, s))) for s in halves) / 2
    assert abs(own.item() - clean.item()) > 0.1


def test_softmax_loss_classifier_is_perturbed(tmp_path, encoder_dir):
    model = sentence_model(encoder_dir)
    loss = losses.SoftmaxLoss(model, sentence_embedding_dimension=16, num_labels=3).double()
    w0 = {**{k: v.detach().clone() for k, v in model.named_parameters()},
          **{f"classifier.{k}": v.detach().clone() for k, v in loss.classifier.named_parameters()}}
    data = {"premise": pairs()["anchor"], "hypothesis": pairs()["positive"], "label": [0, 1, 2, 0, 1, 2, 2, 1]}
    trainer = train(tmp_path, model, loss, data, msam_micro_batch_size=4)
    a, b = columns(trainer.batches[0])
    labels = trainer.batches[0]["label"]

    def loss_of(p, s):  # SoftmaxLoss from its definition: a linear classifier on (u, v, |u - v|), cross-entropy
        u, v = embed(model, {k: t for k, t in p.items() if not k.startswith("classifier.")}, rows(a, s)), embed(
            model, {k: t for k, t in p.items() if not k.startswith("classifier.")}, rows(b, s))
        logits = torch.cat([u, v, (u - v).abs()], dim=-1) @ p["classifier.weight"].T + p["classifier.bias"]
        return torch.nn.functional.cross_entropy(logits, labels[s])

    w = {k: v.clone().requires_grad_() for k, v in w0.items()}
    total = {k: torch.zeros_like(v) for k, v in w0.items()}
    for s in (slice(0, 4), slice(4, 8)):  # mSAM: each micro-batch's own loss, classifier perturbed too
        e = sam(dict(zip(w, torch.autograd.grad(loss_of(w, s), list(w.values()), allow_unused=True, materialize_grads=True))))
        assert e["classifier.weight"].abs().sum() > 0
        g_p = torch.autograd.grad(loss_of({k: w[k] + e[k] for k in w}, s), list(w.values()), allow_unused=True, materialize_grads=True)
        for k, t in zip(w, g_p):
            total[k] += t / 2
    for k, p in [*model.named_parameters(), *[(f"classifier.{k}", v) for k, v in loss.classifier.named_parameters()]]:
        torch.testing.assert_close(p.detach(), w0[k] - LR * total[k], rtol=1e-9, atol=1e-12)


def test_cached_loss_is_refused_at_start_up(tmp_path, encoder_dir):
    model = sentence_model(encoder_dir)
    with pytest.raises(ValueError, match=r"CachedMultipleNegativesRankingLoss runs its own backward.*--msam_micro_batch_size"):
        train(tmp_path, model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), pairs(),
              msam_micro_batch_size=4)
    train(tmp_path, model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), pairs(), msam_rho=0.0)


def test_rho_0_is_bitwise_the_plain_trainer(tmp_path, encoder_dir):
    model = sentence_model(encoder_dir)
    train(tmp_path, model, losses.MultipleNegativesRankingLoss(model), pairs(), msam_rho=0.0, msam_micro_batch_size=4)
    plain = sentence_model(encoder_dir)
    SentenceTransformerTrainer(
        model=plain, args=SentenceTransformerTrainingArguments(
            str(tmp_path / "plain"), per_device_train_batch_size=8, max_steps=1, report_to="none", use_cpu=True,
            learning_rate=LR, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, save_strategy="no"),
        train_dataset=Dataset.from_dict(pairs()), loss=losses.MultipleNegativesRankingLoss(plain),
    ).train()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert not math.isnan(next(model.parameters()).sum().item())


def matryoshka_mnrl(anchors, positives, dims=(16, 8)):
    """MatryoshkaLoss(MultipleNegativesRankingLoss) from its definition: the sum over the dimensions d of the loss of
    the first d features (cosine similarity: the wrapper's re-normalization does not change it)."""
    return sum(mnrl(anchors[:, :d], positives[:, :d]) for d in dims)


def test_matryoshka_around_in_batch_negatives_keeps_the_whole_batch(tmp_path, encoder_dir, caplog):
    model = sentence_model(encoder_dir)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model), matryoshka_dims=[16, 8])
    with caplog.at_level("INFO", logger="hf_msam"):
        trainer = train(tmp_path, model, loss, pairs(), msam_micro_batch_size=4)
    assert "cannot tell" not in caplog.text and "user's own" not in caplog.text
    assert "MatryoshkaLoss(MultipleNegativesRankingLoss) compare(s) the examples of a batch" in caplog.text
    anchors, positives = columns(trainer.batches[0])
    halves = [slice(0, 4), slice(4, 8)]

    def loss_at(points):
        a = torch.cat([embed(model, p, rows(anchors, s)) for p, s in zip(points, halves)])
        b = torch.cat([embed(model, p, rows(positives, s)) for p, s in zip(points, halves)])
        return matryoshka_mnrl(a, b)

    w = {k: v.clone().requires_grad_() for k, v in w0.items()}
    clean = loss_at([w, w])
    e = []
    for j in range(2):
        points = [w if i == j else {k: v.detach() for k, v in w.items()} for i in range(2)]
        part = torch.autograd.grad(loss_at(points), list(w.values()), allow_unused=True, materialize_grads=True)
        e.append(sam({k: 2 * t for k, t in zip(w, part)}))
    perturbed = loss_at([{k: w[k] + e[j][k] for k in w} for j in range(2)])
    descent = torch.autograd.grad(perturbed, list(w.values()), allow_unused=True, materialize_grads=True)

    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(clean.item(), rel=1e-6)
    assert log["msam/perturbed_loss"] == pytest.approx(perturbed.item(), rel=1e-6)
    for (k, p), d in zip(model.named_parameters(), descent):
        torch.testing.assert_close(p.detach(), w0[k] - LR * d, rtol=1e-9, atol=1e-12)


def test_matryoshka_around_a_mean_loss_is_plain_msam(tmp_path, encoder_dir, caplog):
    model = sentence_model(encoder_dir)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = losses.MatryoshkaLoss(model, losses.CosineSimilarityLoss(model), matryoshka_dims=[16, 8], matryoshka_weights=[1.0, 0.5])
    data = {**pairs(), "score": [0.1 * i for i in range(8)]}
    with caplog.at_level("INFO", logger="hf_msam"):
        trainer = train(tmp_path, model, loss, data, msam_micro_batch_size=4)
    assert "cannot tell" not in caplog.text and "user's own" not in caplog.text
    a, b = columns(trainer.batches[0])
    scores = trainer.batches[0]["label"]  # the collator gives the score column as "label"

    def loss_of(p, s):  # Σ_d w_d · mean over the rows of (cos(u_d, v_d) - score)^2
        u, v = embed(model, p, rows(a, s)), embed(model, p, rows(b, s))
        return sum(wd * torch.nn.functional.mse_loss(torch.cosine_similarity(u[:, :d], v[:, :d]), scores[s].double())
                   for d, wd in ((16, 1.0), (8, 0.5)))

    w = {k: v.clone().requires_grad_() for k, v in w0.items()}
    total = {k: torch.zeros_like(v) for k, v in w0.items()}
    for s in (slice(0, 4), slice(4, 8)):  # mSAM: each micro-batch's own loss, weight 1/2
        e = sam(dict(zip(w, torch.autograd.grad(loss_of(w, s), list(w.values()), allow_unused=True, materialize_grads=True))))
        g_p = torch.autograd.grad(loss_of({k: w[k] + e[k] for k in w}, s), list(w.values()), allow_unused=True,
                                  materialize_grads=True)
        for k, t in zip(w, g_p):
            total[k] += t / 2
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w0[k] - LR * total[k], rtol=1e-9, atol=1e-12)


def test_matryoshka_sampling_dimensions_is_said_why(tmp_path, encoder_dir, caplog):
    model = sentence_model(encoder_dir)
    loss = losses.MatryoshkaLoss(model, losses.CosineSimilarityLoss(model), matryoshka_dims=[16, 8, 4], n_dims_per_step=1)
    with caplog.at_level("INFO", logger="hf_msam"):
        train(tmp_path, model, loss, {**pairs(), "score": [0.1 * i for i in range(8)]}, msam_micro_batch_size=4)
    assert "cannot tell whether MatryoshkaLoss(CosineSimilarityLoss)" in caplog.text
    assert "samples 1 of its 3 dimensions at every call (n_dims_per_step=1)" in caplog.text


def test_the_losses_import_path_does_not_warn():
    import importlib
    import warnings

    from hf_msam.st import sentence_transformers_losses

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        module = sentence_transformers_losses()
    assert module.MatryoshkaLoss is losses.MatryoshkaLoss
    assert importlib.util.find_spec("sentence_transformers.sentence_transformer.losses") is not None
