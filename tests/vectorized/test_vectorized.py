"""hf_msam.vectorized against a plain loop over groups, in float64.

The reference takes each group's rows (or tokens) as a batch of their own: its gradient is `torch.autograd.grad`
of the group's mean loss, and its perturbed gradient the same on a deep copy of the model holding w + e_j. The
vectorized side runs the whole batch once, with the loss Σ_j (mean loss of group j), so that group j's part of
the gradient is its own gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from reference import host_syncs
from torch import nn

from hf_msam.vectorized import GroupLayout, NotVectorizable, Vectorizer

RTOL = 1e-10
VOCAB = 40


# ---------------------------------------------------------------------------------------------
# The reference, and the comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    model: nn.Module
    batch: dict
    layout: GroupLayout
    groups: list[dict]  # each group's part of the batch, as a batch of its own
    group_loss: Callable[[nn.Module, dict], torch.Tensor]  # the mean loss of a group's batch
    whole_loss: Callable[[nn.Module, dict], torch.Tensor]  # Σ_j mean loss of group j, from one forward

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def reference_gradients(case: Case, e: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
    """[group][param]: each group's gradient, at w (e None) or at w + e_j (written into a deep copy)."""
    out = []
    for j, batch in enumerate(case.groups):
        model = case.model
        if e is not None:
            model = copy.deepcopy(case.model)
            with torch.no_grad():
                for p, w, t in zip([p for p in model.parameters() if p.requires_grad], case.params, e):
                    p.copy_(w + t[j])
        params = [p for p in model.parameters() if p.requires_grad]
        loss = case.group_loss(model, batch)
        out.append(list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, floor: float, what: str = "") -> None:
    """|actual - expected| <= rtol |expected| + floor: the floor (a tiny fraction of the whole gradient's norm) for
    parameters whose exact gradient is 0 (attention's key bias), which both sides only approximate by roundoff."""
    err = (actual - expected).norm().item()
    scale = expected.norm().item()
    assert err <= rtol * scale + floor, f"{what}: |error| {err:.3g} vs |expected| {scale:.3g}"


def norm_of(tensors: list[torch.Tensor]) -> float:
    return torch.cat([t.flatten() for t in tensors]).norm().item()


def perturbation(case: Case, scale: float = 0.05, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn((case.layout.k, *p.shape), generator=g, dtype=p.dtype) for p in case.params]


def check_case(case: Case, rtol: float = RTOL) -> None:
    """Per-group gradients, the perturbed backward, and per-group gradients at the perturbed weights."""
    params = case.params
    vec = Vectorizer(case.model, params)
    assert vec.why_not() is None, vec.why_not()
    k = case.layout.k

    # (1) capture: every group's gradient, .grad untouched
    sentinel = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinel):
        p.grad = s
    with vec.capture(case.layout) as cap:
        loss = case.whole_loss(case.model, case.batch)
    plain = case.whole_loss(case.model, case.batch)
    assert abs(loss.item() - plain.item()) <= 100 * rtol * abs(plain.item())  # a capture does not change the forward
    cap.verify(loss)
    got = cap.group_gradients(loss)
    assert all(p.grad is s and bool((s == 7.0).all()) for p, s in zip(params, sentinel))
    want = reference_gradients(case)
    floor = 1e-3 * rtol * max(norm_of(w) for w in want)
    for i, (p, g) in enumerate(zip(params, got)):
        assert g.shape == (k, *p.shape) and g.dtype == p.dtype
        for j in range(k):
            assert_close(g[j], want[j][i], rtol, floor, f"group {j}, parameter {i} {list(p.shape)}")

    # (2) perturbed: .grad gets Σ_j group j's gradient at w + e_j; the weights stay bitwise as they were
    e = perturbation(case)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None
    with vec.perturbed(case.layout, e):
        case.whole_loss(case.model, case.batch).backward()
    want_e = reference_gradients(case, e)
    for i, p in enumerate(params):
        assert torch.equal(p, before[i])
        assert_close(p.grad, sum(w[i] for w in want_e), rtol, floor, f"perturbed, parameter {i} {list(p.shape)}")
        p.grad = None

    # (3) both: each group's gradient at its own perturbed weights (GSAM, LookSAM)
    with vec.perturbed(case.layout, e), vec.capture(case.layout) as cap:
        loss = case.whole_loss(case.model, case.batch)
        got = cap.group_gradients(loss)
    for i, p in enumerate(params):
        assert p.grad is None
        for j in range(k):
            assert_close(got[i][j], want_e[j][i], rtol, floor, f"perturbed group {j}, parameter {i}")
    # nothing left behind on the modules
    assert all("forward" not in m.__dict__ for m in case.model.modules())


# ---------------------------------------------------------------------------------------------
# Batches and losses
# ---------------------------------------------------------------------------------------------


def row_groups(batch: dict, sizes: list[int]) -> list[dict]:
    out, a = [], 0
    for s in sizes:
        out.append({k: v[a : a + s] for k, v in batch.items()})
        a += s
    return out


def summed_group_means(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return sum(chunk.mean() for chunk in values.split(sizes))


def classification_case(model: nn.Module, batch: dict, labels: torch.Tensor, sizes: list[int]) -> Case:
    batch = {**batch, "labels_": labels}  # the labels travel with the rows, and stay out of the model's kwargs

    def losses(m, b, reduction):
        logits = m(**{k: v for k, v in b.items() if k != "labels_"}).logits
        return F.cross_entropy(logits, b["labels_"], reduction=reduction)

    return Case(
        model.double(),
        batch,
        GroupLayout.rows(sizes),
        row_groups(batch, sizes),
        lambda m, b: losses(m, b, "mean"),
        lambda m, b: summed_group_means(losses(m, b, "none"), sizes),
    )


def lm_row_losses(model: nn.Module, b: dict) -> torch.Tensor:
    """Each row's mean next-token loss over its attended tokens."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1]
    mask = b["attention_mask"][:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits.transpose(1, 2), b["input_ids"][:, 1:], reduction="none")
    return (ce * mask).sum(1) / mask.sum(1)


def lm_case(model: nn.Module, batch: dict, sizes: list[int]) -> Case:
    return Case(
        model.double(),
        batch,
        GroupLayout.rows(sizes),
        row_groups(batch, sizes),
        lambda m, b: lm_row_losses(m, b).mean(),
        lambda m, b: summed_group_means(lm_row_losses(m, b), sizes),
    )


def token_batch(n: int, length: int, pad: bool, seed: int = 0, pad_id: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if pad:  # right padding of different lengths
        for i in range(0, n, 2):
            cut = length - 1 - (i % 4)
            mask[i, cut:] = 0
            ids[i, cut:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


def bert(sizes: list[int], lora: bool = False) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
        model = get_peft_model(model, lora)
    n = sum(sizes)
    batch = token_batch(n, 10, pad=True)
    batch["token_type_ids"] = (torch.arange(10) >= 5).long().expand(n, -1).clone()
    return classification_case(model, batch, torch.arange(n) % 3, sizes)


def roberta(sizes: list[int]) -> Case:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=20, num_labels=2, pad_token_id=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    n = sum(sizes)
    batch = token_batch(n, 10, pad=True, pad_id=1)  # RoBERTa's position ids skip padding: padding_idx in use
    return classification_case(RobertaForSequenceClassification(config), batch, torch.arange(n) % 2, sizes)


def distilbert(sizes: list[int]) -> Case:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=16, num_labels=2,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    n = sum(sizes)
    model = DistilBertForSequenceClassification(config)
    return classification_case(model, token_batch(n, 10, pad=True), torch.arange(n) % 2, sizes)


def vit(sizes: list[int]) -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    n = sum(sizes)
    pixels = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return classification_case(ViTForImageClassification(config), {"pixel_values": pixels}, torch.arange(n) % 3, sizes)


def gpt2(sizes: list[int]) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, two layers
    return lm_case(model, token_batch(sum(sizes), 10, pad=True), sizes)


def llama(sizes: list[int], attn: str, tie: bool, lora: bool = False, qwen: bool = False) -> Case:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    kind = Qwen2Config if qwen else LlamaConfig
    config = kind(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    if lora:
        from peft import LoraConfig, get_peft_model

        # LoRA on the embedding keeps its A and B in ParameterDicts, read by the LoRA layer: the fallback takes it
        target = ["embed_tokens", "q_proj", "v_proj"]
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target)
        model = get_peft_model(model, lora)
    return lm_case(model, token_batch(sum(sizes), 10, pad=attn == "sdpa"), sizes)


MODELS = {
    "bert": lambda: bert([3, 3, 1]),
    "roberta": lambda: roberta([2, 2, 2, 2]),
    "distilbert": lambda: distilbert([4, 3]),
    "gpt2-tied": lambda: gpt2([3, 3, 1]),
    "llama-sdpa": lambda: llama([2, 2, 2, 2], "sdpa", tie=False),
    "llama-eager-tied": lambda: llama([3, 3, 1], "eager", tie=True),
    "qwen2": lambda: llama([4, 4], "sdpa", tie=False, qwen=True),
    "vit": lambda: vit([3, 3, 1]),
    "lora-bert": lambda: bert([3, 3, 1], lora=True),
    "lora-llama": lambda: llama([4, 4], "sdpa", tie=False, lora=True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_match_the_per_group_loop(name):
    case = MODELS[name]()
    case.model.train()  # dropout is 0: train mode must not change anything
    check_case(case)


def test_lora_routes_only_the_trainable_layers():
    case = bert([3, 3, 1], lora=True)
    vec = Vectorizer(case.model, case.params)
    assert vec.fallback_modules() == []  # lora_A, lora_B and the classifier copy are plain nn.Linear
    with vec.capture(case.layout) as cap:
        hooked = [n for n, m in case.model.named_modules() if "forward" in m.__dict__]
        loss = case.whole_loss(case.model, case.batch)
    assert hooked and all("lora_" in n or "modules_to_save" in n for n in hooked), hooked
    got = cap.group_gradients(loss)
    assert len(got) == len(case.params) < 20


# ---------------------------------------------------------------------------------------------
# Other layouts
# ---------------------------------------------------------------------------------------------


def test_pairs_layout_reward_model():
    """Rows 0..n-1 chosen, n..2n-1 rejected; a group holds pairs a..b-1 with their rejected rows n+a..n+b-1."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config).double()
    sizes = [2, 2, 1]
    n = sum(sizes)
    batch = token_batch(2 * n, 8, pad=True)

    def pair_losses(m, b):
        scores = m(**b).logits[:, 0]
        half = scores.shape[0] // 2
        return -F.logsigmoid(scores[:half] - scores[half:])

    groups, a = [], 0
    for s in sizes:
        groups.append({k: torch.cat([v[a : a + s], v[n + a : n + a + s]]) for k, v in batch.items()})
        a += s
    layout = GroupLayout.pairs(sizes)
    assert layout.members[1] == (2, 3, 7, 8) and layout.extent == 10
    check_case(Case(
        model, batch, layout, groups,
        lambda m, b: pair_losses(m, b).mean(),
        lambda m, b: summed_group_means(pair_losses(m, b), sizes),
    ))


def test_tokens_layout_packed_llama():
    """One packed row [1, T]: sequences restart their position_ids; a group is a run of whole sequences."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()
    lengths = [4, 3, 5, 2, 4]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    ids = torch.randint(2, VOCAB, (1, bounds[-1]), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    assert GroupLayout.tokens(bounds, 2).sizes == (2, 2, 1)  # as split_packed cuts: sequences {0, 1}, {2, 3}, {4}
    layout = GroupLayout.tokens(bounds, [2, 1, 2])  # the short group in the middle: its padding matters
    assert layout.members[1] == tuple(range(7, 12))

    def token_losses(m, b):
        """Next-token loss at every token that has a next token in its own sequence (0 elsewhere), and a mask."""
        logits = m(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0, :-1]
        target = b["input_ids"][0, 1:]
        has_next = (b["position_ids"][0, 1:] != 0).to(logits.dtype)
        return F.cross_entropy(logits, target, reduction="none") * has_next, has_next

    def group_loss(m, b):
        losses, mask = token_losses(m, b)
        return losses.sum() / mask.sum()

    def whole_loss(m, b):
        losses, mask = token_losses(m, b)
        total = 0
        for members in layout.members:  # a token's loss belongs to the group of the token it predicts from
            a, z = members[0], members[-1]  # the last token of a group predicts nothing (masked)
            total = total + losses[a:z].sum() / mask[a:z].sum()
        return total

    batch = {"input_ids": ids, "position_ids": position_ids}
    groups = [{k: v[:, m[0] : m[-1] + 1] for k, v in batch.items()} for m in layout.members]
    check_case(Case(model, batch, layout, groups, group_loss, whole_loss))


def test_layouts():
    assert GroupLayout.rows([3, 3, 1]) is GroupLayout.rows((3, 3, 1))  # cached: index tensors built once per device
    rows = GroupLayout.rows([3, 3, 1])
    assert rows.k == 3 and rows.members == ((0, 1, 2), (3, 4, 5), (6,))
    pos = rows.positions("cpu")
    x = torch.arange(7.0).view(7, 1)
    assert pos.grouped(x).squeeze(-1).tolist() == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]  # padding repeats a real row
    assert pos.grouped(x, zero_pad=True).squeeze(-1).tolist() == [[0, 1, 2], [3, 4, 5], [6, 0, 0]]
    assert torch.equal(pos.ungrouped(pos.grouped(x)), x)
    pairs = GroupLayout.pairs([1, 2])
    assert pairs.members == ((0, 3), (1, 2, 4, 5)) and pairs.extent == 6
    p = pairs.positions("cpu")
    y = torch.arange(6.0)
    assert torch.equal(p.ungrouped(p.grouped(y)), y)
    tokens = GroupLayout.tokens([0, 2, 5, 6], [2, 1])
    assert tokens.members == ((0, 1, 2, 3, 4), (5,)) and tokens.axis == 1
    t = tokens.positions("cpu")
    z = torch.arange(6.0).view(1, 6, 1)
    assert torch.equal(t.ungrouped(t.grouped(z)), z)
    with pytest.raises(ValueError):
        GroupLayout.rows([2, 0])
    with pytest.raises(ValueError):
        GroupLayout.tokens([0, 2, 5], [3])


# ---------------------------------------------------------------------------------------------
# Layers the rules do not know, and what is refused
# ---------------------------------------------------------------------------------------------


class Gate(nn.Module):
    """A custom layer with a direct parameter, nonlinear in it: only the torch.func fallback can take it."""

    def __init__(self, d: int):
        super().__init__()
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.g) + self.g.square()


class SmallCNN(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm, self.gate, self.head = nn.Conv2d(3, 4, 3, padding=1), norm, Gate(4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return self.head(self.gate(self.gate(h)))  # one module, two calls: each call counts


def cnn_case(model: nn.Module, sizes: list[int]) -> Case:
    n = sum(sizes)
    x = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return classification_case(_Logits(model), {"x": x}, torch.arange(n) % 3, sizes)


class _Logits(nn.Module):
    """Outputs `.logits`, as transformers' models do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return SimpleNamespace(logits=self.inner(x))


def test_fallback_layers_conv_batchnorm_eval_custom():
    torch.manual_seed(0)
    case = cnn_case(SmallCNN(nn.BatchNorm2d(4)), [3, 3, 1])
    case.model.eval()  # BatchNorm in eval mode: a per-position affine layer
    with torch.no_grad():
        case.model.inner.norm.running_mean.uniform_(-0.5, 0.5)
        case.model.inner.norm.running_var.uniform_(0.5, 2.0)
    vec = Vectorizer(case.model, case.params)
    # the Conv2d has its rule (rules/conv.py); the eval-mode BatchNorm and the custom layer fall back
    assert sorted(vec.fallback_modules()) == ["inner.gate (Gate)", "inner.norm (BatchNorm2d)"]
    check_case(case)


class Mixer(nn.Module):
    """nn.MultiheadAttention (parameters of its own, its out_proj read directly) and GroupNorm: both fall back."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 3)
        self.attn, self.norm = nn.MultiheadAttention(8, 2, batch_first=True), nn.GroupNorm(2, 8)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]  # returns (output, None)
        return self.head(self.norm(h.transpose(1, 2)).mean(2))


def test_fallback_layers_attention_groupnorm():
    torch.manual_seed(0)
    case = cnn_case(SmallCNN(nn.GroupNorm(2, 4)), [2, 2, 2, 1])
    check_case(case)
    case = classification_case(_Logits(Mixer()), {"x": torch.randint(0, VOCAB, (7, 5))}, torch.arange(7) % 3, [3, 3, 1])
    fallbacks = Vectorizer(case.model, case.params).fallback_modules()
    assert fallbacks == ["inner.attn (MultiheadAttention)", "inner.norm (GroupNorm)"]
    check_case(case)


def test_batchnorm_in_train_mode_is_refused():
    torch.manual_seed(0)
    case = cnn_case(SmallCNN(nn.BatchNorm2d(4)), [4, 4])
    vec = Vectorizer(case.model, case.params)
    assert "BatchNorm2d in train mode" in vec.why_not()
    with pytest.raises(NotVectorizable, match="BatchNorm2d"):
        with vec.capture(case.layout):
            pass
    case.model.eval()
    assert Vectorizer(case.model, case.params).why_not() is None


def test_why_not_without_fallback_names_the_layer():
    torch.manual_seed(0)
    model = SmallCNN(nn.GroupNorm(2, 4))
    reason = Vectorizer(model, list(model.parameters()), allow_fallback=False).why_not()
    assert "norm (GroupNorm) holds trainable parameter weight" in reason and "gate (Gate)" in reason
    assert "head" not in reason and "conv" not in reason  # Linear and Conv2d have rules
    reason = Vectorizer(model, [*model.parameters(), nn.Parameter(torch.zeros(2))]).why_not()
    assert "not parameters of the model" in reason
    lstm = nn.LSTM(4, 4, batch_first=True)
    assert "recurrent layers have no vmap rule" in Vectorizer(lstm, list(lstm.parameters())).why_not()
    encoder = nn.TransformerEncoderLayer(8, 2, 16)
    assert "batch_first=False" in Vectorizer(encoder, list(encoder.parameters())).why_not()


def test_why_not_names_dora_and_reentrant_gradient_checkpointing():
    from peft import LoraConfig, get_peft_model

    case = llama([2, 2], "sdpa", tie=False)
    case.model.activation_checkpointing_enable()  # non-reentrant, transformers' default: vectorizes
    assert Vectorizer(case.model, case.params).why_not() is None
    case.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert "reentrant gradient checkpointing" in Vectorizer(case.model, case.params).why_not()
    case.model.activation_checkpointing_disable()
    model = get_peft_model(case.model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in Vectorizer(model, [p for p in model.parameters() if p.requires_grad]).why_not()


class Reshaping(nn.Module):
    """A head that flattens the batch away before its Linear."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 2)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h.reshape(-1, h.shape[-1])).view(ids.shape[0], -1).mean(1)


def test_a_layer_that_sees_the_batch_reshaped_raises_and_leaves_the_model_clean():
    torch.manual_seed(0)
    model = Reshaping().double()
    ids = torch.randint(0, VOCAB, (6, 5))
    params = list(model.parameters())
    vec = Vectorizer(model, params)
    assert vec.why_not() is None  # only the forward can tell
    layout = GroupLayout.rows([3, 3])
    before = [p.detach().clone() for p in params]
    with pytest.raises(NotVectorizable, match=r"head \(Linear\) got an input of shape \[30, 8\]"):
        with vec.capture(layout):
            model(ids)
    e = [torch.ones(2, *p.shape, dtype=p.dtype) for p in params]
    with pytest.raises(NotVectorizable, match="leading dims are not the batch"):
        with vec.perturbed(layout, e):
            model(ids)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_weights_unchanged_when_the_forward_raises_inside_perturbed():
    case = gpt2([2, 2])
    params = case.params
    vec = Vectorizer(case.model, params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="boom"):
        with vec.perturbed(case.layout, perturbation(case, scale=1.0)):
            case.whole_loss(case.model, case.batch)
            raise RuntimeError("boom")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # and the next forward is the plain one again
    assert torch.equal(case.whole_loss(case.model, case.batch), case.whole_loss(copy.deepcopy(case.model), case.batch))


class DirectUse(nn.Module):
    """Uses a child's weight outside the child's call (as DoRA's weight norm does): invisible to hooks."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + F.linear(x, self.lin.weight.square())


def test_verify_catches_a_weight_read_outside_its_layer():
    torch.manual_seed(0)
    model = DirectUse().double()
    vec = Vectorizer(model, list(model.parameters()))
    with vec.capture(GroupLayout.rows([2, 2])) as cap:
        loss = model(torch.randn(4, 4, dtype=torch.float64)).sum()
    with pytest.raises(NotVectorizable, match=r"lin\.weight \(parameter 0\) \[4, 4\]"):
        cap.verify(loss)
    with vec.capture(GroupLayout.rows([2, 2])) as cap:
        loss = model.lin(torch.randn(4, 4, dtype=torch.float64)).sum() + model.lin.weight.square().sum()  # a penalty
    with pytest.raises(NotVectorizable, match="parameter 0"):
        cap.verify(loss)


def test_perturbation_that_requires_grad_gets_each_groups_gradient():
    """Through the perturbed Linear and Conv1D, ∂loss/∂e_j is group j's gradient at w + e_j."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), Conv1D(4, 5)).double()
    x = torch.randn(7, 3, 6, dtype=torch.float64)
    sizes = [3, 3, 1]
    layout = GroupLayout.rows(sizes)
    params = list(model.parameters())
    vec = Vectorizer(model, params)
    e = [0.1 * torch.randn(3, *p.shape, dtype=p.dtype) for p in params]
    e[0].requires_grad_(True)
    e[2].requires_grad_(True)
    with vec.perturbed(layout, e), vec.capture(layout) as cap:
        loss = summed_group_means(model(x).square().sum((1, 2)), sizes)
        de = torch.autograd.grad(loss, [e[0], e[2]], retain_graph=True)
        got = cap.group_gradients(loss)
    assert_close(de[0], got[0], RTOL, 0.0, "Linear weight")
    assert_close(de[1], got[2], RTOL, 0.0, "Conv1D weight")


# ---------------------------------------------------------------------------------------------
# Precision, autocast, host syncs
# ---------------------------------------------------------------------------------------------


def test_float32_agrees_to_single_precision():
    case = llama([3, 3, 1], "sdpa", tie=True)
    case.model.float()
    check_case(case, rtol=2e-5)


def test_bf16_autocast_runs_and_approximates():
    """Under CPU autocast the layers run in bf16: the per-group gradients must still be the reference's, to bf16
    precision."""
    case = bert([4, 4])
    case.model.float()
    params = case.params
    vec = Vectorizer(case.model, params)
    want = reference_gradients(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with vec.capture(case.layout) as cap:
            loss = case.whole_loss(case.model, case.batch)
        got = cap.group_gradients(loss)
        with vec.perturbed(case.layout, [0 * t for t in perturbation(case)]):
            case.whole_loss(case.model, case.batch).backward()
    assert all(g.dtype == torch.float32 for g in got)
    for i in range(len(params)):
        want_i = torch.stack([w[i] for w in want])
        assert (got[i] - want_i).norm() <= 0.05 * want_i.norm() + 1e-6
        assert (params[i].grad - want_i.sum(0)).norm() <= 0.05 * want_i.sum(0).norm() + 1e-6


class Tiny(nn.Module):
    """Every rule and the fallback, and no host sync of its own."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb, self.norm, self.conv1d, self.gate, self.rms, self.head = (
            nn.Embedding(VOCAB, 8, padding_idx=0), nn.LayerNorm(8), Conv1D(8, 8),
            Gate(8), nn.RMSNorm(8), nn.Linear(8, 3),
        )

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = self.norm(torch.tanh(self.conv1d(h)))  # a layer with a rule, called twice
        return self.head(self.rms(self.gate(h))).mean(1)


def test_no_host_sync():
    torch.manual_seed(0)
    model = Tiny().double()
    ids = torch.randint(1, VOCAB, (7, 5))
    ids[::2, -2:] = 0  # padding_idx: its row gets no gradient
    sizes = [3, 3, 1]
    params = list(model.parameters())
    vec = Vectorizer(model, params)
    layout = GroupLayout.rows(sizes)
    layout.positions("cpu")  # built once per device, outside the hot path
    e = [torch.randn(3, *p.shape, dtype=p.dtype) * 0.01 for p in params]
    calls: list[str] = []
    with host_syncs(calls):
        with vec.capture(layout) as cap:
            loss = summed_group_means(model(ids).logsumexp(1), sizes)
        cap.group_gradients(loss)
        with vec.perturbed(layout, e), vec.capture(layout) as cap:
            loss = summed_group_means(model(ids).logsumexp(1), sizes)
            cap.group_gradients(loss, retain_graph=True)
            loss.backward()
    assert calls == []
    case = Case(
        model, {"ids": ids}, layout, row_groups({"ids": ids}, sizes),
        lambda m, b: m(b["ids"]).logsumexp(1).mean(),
        lambda m, b: summed_group_means(m(b["ids"]).logsumexp(1), sizes),
    )
    for p in params:
        p.grad = None
    check_case(case)


@pytest.mark.parametrize("shape, sizes", [((8, 5, 6), [2, 2, 2, 2]), ((7, 6), [3, 3, 1])])
def test_a_linear_whose_bias_alone_moves_sees_its_groups_bias(shape, sizes):
    """A frozen weight and a trainable bias take the Δ path (y + e_b,j), in equal groups (one view) and uneven ones
    (padding): each group's rows equal F.linear at b + e_b,j, and each group's gradient of a sum of its rows' outputs."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    lin.weight.requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.float64)
    vec, layout = Vectorizer(lin, [lin.bias]), GroupLayout.rows(sizes)
    e = torch.randn(len(sizes), 4, dtype=torch.float64)
    with vec.routing(), vec.perturbed(layout, [e]):
        y = lin(x)
    expected = torch.cat([F.linear(xs, lin.weight, lin.bias + e[j]) for j, xs in enumerate(x.split(sizes))])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert (y - lin(x)).abs().max() > 0.1  # the perturbation moved the output
    with vec.routing(), vec.capture(layout) as capture:
        g = capture.group_gradients((lin(x) ** 2).sum())[0]
    for j, xs in enumerate(x.split(sizes)):
        b = lin.bias.detach().clone().requires_grad_(True)
        (g_j,) = torch.autograd.grad((F.linear(xs, lin.weight, b) ** 2).sum(), b)
        torch.testing.assert_close(g[j], g_j, rtol=0, atol=1e-12)
