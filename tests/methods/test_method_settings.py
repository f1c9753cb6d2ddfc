"""Methods own their settings: a factory's keyword parameters, set with `--msam_method_args` (command line, Python
dict, TRL configs, `hf-msam run`) or `build_method(..., method_args=...)`, against plain-PyTorch references; the
dedicated flags that came before; the help, docstring and table written from the registry; the errors; the import
circles the registry no longer makes; and `--msam_precondition adam` refused when the trainer is built."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import MLP, flat, mlp_dataset
from test_methods import (CASES, LR, TIGHT, Reference, grad_at, micro_batches, mlp, params_of, reference_run, stack, train,
                          trainer_args)
from transformers import HfArgumentParser, TrainingArguments

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments, SAMDescent, SAMPerturbation, build_method
from hf_msam.methods import REGISTRY, methods_table, register_method
from hf_msam.methods.registry import method_default
from hf_msam.training_args import MSAMArguments, msam_default

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registered():
    """Register methods for one test, and leave the registry as it was."""
    before = dict(REGISTRY)
    yield register_method
    REGISTRY.clear()
    REGISTRY.update(before)


def register_scaled(register):
    """A method with two settings of its own: the radius scaled by `factor`, the ascent turned around by `flip`."""

    @register("scaled", paper="SAM at a fraction of the radius", cost="2 passes per micro-batch")
    def build(args, factor: float = 0.5, flip: bool = False):
        return SAMPerturbation(rho=args.msam_rho * factor * (-1 if flip else 1)), SAMDescent()

    return build


def sam_reference_step(model, data, mbs, rho):
    """One SGD step of mSAM in plain PyTorch: w − lr·Σ_j c_j ∇L_j(w + ρ g_j/‖g_j‖) (a negative ρ climbs down)."""
    w = flat(params_of(model)).detach().clone()
    total = torch.zeros_like(w)
    for mb, c in micro_batches(stack(data), mbs):
        g = grad_at(model, w, mb)
        total += c * grad_at(model, w + rho * g / (g.norm() + 1e-12), mb)
    return w - LR * total


def parsed(tmp_path, *argv):
    """MSAMTrainingArguments from a command line, as a script's HfArgumentParser reads it."""
    common = ["--output_dir", str(tmp_path), "--per_device_train_batch_size", "6", "--max_steps", "1", "--optim", "sgd",
              "--learning_rate", str(LR), "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--weight_decay", "0",
              "--train_sampling_strategy", "sequential", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
              "--logging_strategy", "no", "--disable_tqdm", "true", "--msam_rho", "0.4", "--msam_micro_batch_size", "2"]  # fmt: skip
    (args,) = HfArgumentParser(MSAMTrainingArguments).parse_args_into_dataclasses([*common, *argv])
    return args


# ---------------------------------------------------------------------------------------------
# A method's own settings, through the arguments and in Python
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method_args, rho", [("factor=0.25,flip=true", -0.1), ("factor=2", 0.8), ("", 0.2)])
def test_own_method_settings_from_the_command_line_train_as_the_reference(tmp_path, registered, method_args, rho):
    register_scaled(registered)
    model, data = mlp(), mlp_dataset(6)
    expected = sam_reference_step(mlp(), data, 2, rho)
    args = parsed(tmp_path, "--msam_method", "scaled", "--msam_method_args", method_args)
    assert args.msam_method_args == dict(p.split("=") for p in method_args.split(",") if p)  # parsed, values as given
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    assert trainer.msam_perturbation.rho == pytest.approx(rho, rel=1e-15)
    trainer.train()
    torch.testing.assert_close(flat(params_of(model)).detach(), expected, **TIGHT)
    # Guard: the settings changed the step (ρ = 0.4·0.5, the defaults, is another point).
    if method_args:
        assert not torch.allclose(expected, sam_reference_step(mlp(), data, 2, 0.2), rtol=1e-6, atol=0)


def test_own_method_settings_as_a_python_dict_and_through_build_method(tmp_path, registered):
    register_scaled(registered)
    data = mlp_dataset(6)
    expected = sam_reference_step(mlp(), data, 2, -0.3)
    model = mlp()
    args = trainer_args(tmp_path, 6, 1, msam_rho=0.4, msam_micro_batch_size=2, msam_method="scaled",
                        msam_method_args={"factor": 0.75, "flip": True})  # fmt: skip
    MSAMTrainer(model=model, args=args, train_dataset=data).train()
    torch.testing.assert_close(flat(params_of(model)).detach(), expected, **TIGHT)
    # build_method: method_args over the arguments' own, and the ints and strings of a dict converted
    assert build_method("scaled", args)[0].rho == pytest.approx(-0.3)
    assert build_method("scaled", args, method_args={"factor": 1})[0].rho == pytest.approx(-0.4)
    assert build_method("scaled", rho=0.4, method_args="factor=0.5,flip=no")[0].rho == pytest.approx(0.2)
    assert build_method("scaled", rho=0.4, method_args='{"factor": 0.25}')[0].rho == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["gsam", "fsam", "looksam"])
def test_builtin_settings_through_method_args_equal_their_flags_and_the_paper(tmp_path, method):
    """The same run from --msam_method_args and from the dedicated flags: bitwise the same weights, and the paper's."""
    flags, h = CASES[method]
    settings = {name.split("_")[-1]: value for name, value in flags.items() if name != "msam_method"}
    model, data = mlp(), mlp_dataset(15)
    expected = reference_run(model, data, 3, 5, method=method, mbs=2, **h)
    by_flags = train(mlp(), data, tmp_path / "flags", 5, 3, msam_micro_batch_size=2, **flags)
    text = ",".join(f"{k}={v}" for k, v in settings.items())  # as on a command line: strings, converted
    by_args = train(mlp(), data, tmp_path / "args", 5, 3, msam_micro_batch_size=2, msam_method=method, msam_method_args=text)
    assert torch.equal(by_args, by_flags)
    torch.testing.assert_close(by_args, expected, **TIGHT)
    # A dedicated flag left at its default and the key given: the key's value.
    default = {name: msam_default(name) for name in flags if name != "msam_method"}
    mixed = train(mlp(), data, tmp_path / "mixed", 5, 3, msam_micro_batch_size=2, msam_method=method, msam_method_args=settings,
                  **default)  # fmt: skip
    assert torch.equal(mixed, by_flags)


def test_build_method_with_method_args_gives_the_papers_gradient():
    """GSAM's alpha from method_args, in the engine, against the hand-written GSAM reference."""
    torch.manual_seed(0)
    model = MLP().double()
    batch = stack(mlp_dataset(6, seed=2))
    w = flat(params_of(model)).detach().clone()
    expected = Reference(model, "gsam", 3, alpha=0.4).gradient(w, batch, rho=0.3)
    ascent, descent = build_method("gsam", rho=0.3, method_args={"alpha": 0.4})
    assert repr(descent) == "GSAMDescent(alpha=0.4)"
    engine = MicroBatchSAM(model, micro_batch_size=3, perturbation=ascent, descent=descent)
    engine.backward(batch, lambda mb: model(**mb)["loss"])
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), expected, **TIGHT)
    by_flag = build_method("gsam", rho=0.3, gsam_alpha=0.4)
    assert (repr(by_flag[0]), repr(by_flag[1])) == (repr(ascent), repr(descent))


def test_flat_lora_settings_through_method_args_equal_the_flags_and_the_reference():
    pytest.importorskip("peft")
    from test_flat_lora import adapters, reference_gradient, tiny_lora

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    grads = {}
    for route, kwargs in {"args": dict(method_args="sigma=0.3,schedule=constant"),
                          "flags": dict(flat_lora_sigma=0.3, flat_lora_schedule="constant")}.items():  # fmt: skip
        model = tiny_lora()
        rule, descent = build_method("flat_lora", **kwargs)
        assert (rule.sigma, rule.schedule) == (0.3, "constant")
        engine = MicroBatchSAM(model, micro_batch_size=2, perturbation=rule, descent=descent)
        engine.backward({"x": x, "y": y}, lambda mb: model(**mb), step=4)
        grads[route] = [p.grad.clone() for p in adapters(model)]
    expected = reference_gradient(tiny_lora(), x, y, [2, 2, 2], sigma_t=0.3, seed=0, step=4)
    for a, b, e in zip(grads["args"], grads["flags"], expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Errors: at argument time, naming --msam_method_args, the method and its settings
# ---------------------------------------------------------------------------------------------


GSAM_SETTINGS = r"The settings of --msam_method gsam: alpha \(float, default 0\.1; or --msam_gsam_alpha\)"
LOOKSAM_SETTINGS = (r"The settings of --msam_method looksam: k \(int, default 5; or --msam_looksam_k\), "
                    r"alpha \(float, default 0\.7; or --msam_looksam_alpha\)")
BAD = {  # what is given: what the error says
    "unknown key": (dict(msam_method="gsam", msam_method_args="beta=0.2"),
                    r"--msam_method_args: --msam_method gsam has no setting 'beta'\. " + GSAM_SETTINGS),
    "another method's key": (dict(msam_method="gsam", msam_method_args={"alpha": "0.2", "k": 3}),
                             r"has no setting 'k' \(k is a setting of --msam_method looksam\)\. " + GSAM_SETTINGS),
    "no settings": (dict(msam_method="sam", msam_method_args="alpha=0.2"),
                    r"--msam_method sam has no setting 'alpha' \(alpha is a setting of --msam_method gsam, looksam\)\. "
                    r"--msam_method sam has no settings of its own"),
    "not a float": (dict(msam_method="gsam", msam_method_args="alpha=much"),
                    r"--msam_method_args: alpha of --msam_method gsam must be a float, got 'much'\. " + GSAM_SETTINGS),
    "not an int": (dict(msam_method="looksam", msam_method_args={"k": 2.5}),
                   r"--msam_method_args: k of --msam_method looksam must be an int, got 2\.5 \(a float\)\. " + LOOKSAM_SETTINGS),
    "flag and key": (dict(msam_method="gsam", msam_gsam_alpha=0.3, msam_method_args="alpha=0.2"),
                     r"--msam_gsam_alpha 0\.3 and --msam_method_args alpha=0\.2 both set alpha of --msam_method gsam: give "
                     r"one of them\. " + GSAM_SETTINGS),
    "out of range": (dict(msam_method="gsam", msam_method_args="alpha=-1"),
                     r"alpha of --msam_method gsam \(--msam_method_args alpha=\.\.\., or --msam_gsam_alpha\) must be a finite "
                     r"number >= 0"),
    "lambda": (dict(msam_method="fsam", msam_method_args="lambda=1"), r"lambda of --msam_method fsam .* must be a number in \[0, 1\)"),
    "schedule": (dict(msam_method="flat_lora", msam_method_args="schedule=linear"),
                 r"schedule of --msam_method flat_lora .* must be one of cosine, constant"),
    "not key=value": (dict(msam_method="gsam", msam_method_args="alpha"), r"--msam_method_args: 'alpha' is not key=value"),
    "twice": (dict(msam_method="gsam", msam_method_args="alpha=1,alpha=2"), r"--msam_method_args gives 'alpha' twice"),
    "bad JSON": (dict(msam_method="gsam", msam_method_args="{nope"), r"--msam_method_args '\{nope' is not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_method_args_are_refused_when_the_arguments_are_built(tmp_path, case):
    kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        MSAMTrainingArguments(str(tmp_path), **kwargs)


def test_own_method_errors_list_its_settings_with_types_and_defaults(tmp_path, registered):
    register_scaled(registered)
    with pytest.raises(ValueError, match=r"--msam_method_args: flip of --msam_method scaled must be a bool \(true/false, yes/no, "
                       r"1/0 or on/off\), got 'maybe'\. The settings of --msam_method scaled: factor \(float, default 0\.5\), "
                       r"flip \(bool, default False\)"):  # fmt: skip
        parsed(tmp_path, "--msam_method", "scaled", "--msam_method_args", "flip=maybe")
    with pytest.raises(ValueError, match="flip of --msam_method scaled must be a bool .*, got 1 \\(an int\\)"):
        build_method("scaled", method_args={"flip": 1})
    args = MSAMTrainingArguments(str(tmp_path), msam_method="scaled", msam_method_args="factor=0.1")
    args.msam_method_args = "factor=fast"  # changed after the arguments were built: checked when the trainer starts
    with pytest.raises(ValueError, match="factor of --msam_method scaled must be a float, got 'fast'"):
        MSAMTrainer(model=MLP(), args=args)


def test_a_setting_is_declared_with_a_default_of_a_plain_type(registered):
    with pytest.raises(ValueError, match=r"register_method\('nodefault'\): the factory's parameter 'factor' after `args` is a "):
        registered("nodefault")(lambda args, factor: (SAMPerturbation(), SAMDescent()))
    with pytest.raises(ValueError, match="must be of type int, float, bool or str"):
        registered("listy")(lambda args, sizes=[1, 2]: (SAMPerturbation(), SAMDescent()))  # noqa: B006
    with pytest.raises(ValueError, match="dedicated_flags names"):
        registered("flagless", dedicated_flags={"alpha": "msam_gsam_alpha"})(lambda args: (SAMPerturbation(), SAMDescent()))

    @registered("keyword")
    def build(args, lambda_: float = 0.5, *rest, **more):  # a keyword's name: `lambda_` is the setting `lambda`
        return SAMPerturbation(rho=lambda_), SAMDescent()

    settings = [(s.name, s.parameter, s.type, s.default) for s in REGISTRY["keyword"].settings]
    assert settings == [("lambda", "lambda_", float, 0.5)]
    assert build_method("keyword", method_args="lambda=0.2")[0].rho == 0.2


# ---------------------------------------------------------------------------------------------
# What a user reads is written from the registry when it is read
# ---------------------------------------------------------------------------------------------


def test_a_method_registered_before_parsing_is_in_the_help_docstring_and_table(registered):
    before = HfArgumentParser(MSAMTrainingArguments).format_help()
    assert "scaled" not in before
    for name in ("sam", "gsam", "fsam", "looksam", "momentum", "functional", "flat_lora", "logits_sam"):
        assert f"{name} (" in " ".join(before.split())
    register_scaled(registered)
    registered("percent", paper="100% of SAM")(lambda args: (SAMPerturbation(), SAMDescent()))  # a "%" for argparse
    parser = HfArgumentParser(MSAMTrainingArguments)
    helps = {a.dest: " ".join(a.help.split()) for a in parser._actions}
    assert "scaled (SAM at a fraction of the radius; 2 passes per micro-batch)" in helps["msam_method"]
    assert "scaled: factor (float, default 0.5), flip (bool, default False)" in helps["msam_method_args"]
    assert "Works with msam_method sam, fsam, momentum, logits_sam, scaled, percent;" in helps["msam_sync_perturbation"]
    text = " ".join(parser.format_help().split())  # argparse %-formats each help: the "%" of a paper is kept
    assert "percent (100% of SAM)" in text and "scaled: factor (float, default 0.5)" in text
    doc = " ".join(MSAMArguments.__doc__.split())
    assert "scaled (SAM at a fraction of the radius; 2 passes per micro-batch)" in doc
    assert "scaled: factor (float, default 0.5), flip (bool, default False)" in doc
    assert "msam_precondition (`str`" in doc and "For msam_method sam, functional." in doc
    rows = {row.name: row for row in methods_table()}
    assert list(rows)[-2:] == ["scaled", "percent"]
    assert rows["scaled"] == ("scaled", "SAM at a fraction of the radius", "factor (float, default 0.5), flip (bool, default False)",
                              "2 passes per micro-batch")  # fmt: skip
    assert rows["looksam"].settings == ("k (int, default 5; or --msam_looksam_k), "
                                        "alpha (float, default 0.7; or --msam_looksam_alpha)")
    assert rows["sam"].settings == "none"
    assert all(row.paper and row.cost for name, row in rows.items() if name != "percent")


def test_a_method_registered_after_the_parser_is_built_is_in_its_help_and_parses(registered, tmp_path):
    """The help, the parse and the error read the registry when they run, not when the parser was built."""
    parser = HfArgumentParser(MSAMTrainingArguments)
    names = " ".join(parser.format_help().split())
    assert "scaled" not in names and "flat_lora (" in names
    register_scaled(registered)  # after the parser is built
    text = " ".join(parser.format_help().split())
    assert "scaled (SAM at a fraction of the radius; 2 passes per micro-batch)" in text
    assert "scaled: factor (float, default 0.5), flip (bool, default False)" in text
    assert "Works with msam_method sam, fsam, momentum, logits_sam, scaled;" in text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--msam_method", "scaled", "--msam_method_args", "factor=0.25", "--msam_rho", "0.4"]
    )
    assert build_method(args.msam_method, args)[0].rho == pytest.approx(0.1)  # the parsed setting reaches the method
    registered("latecomer")(lambda args: (SAMPerturbation(), SAMDescent()))
    with pytest.raises(ValueError, match=r"registered methods \(sam, .*, flat_lora, logits_sam, scaled, latecomer\), got 'nope'"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--msam_method", "nope"])
    REGISTRY.pop("latecomer")  # unregistered: the same parser's help forgets it
    assert "latecomer" not in parser.format_help()


def test_no_hand_written_list_of_method_names_is_left():
    """No line of hf_msam/methods or training_args.py names three built-in methods: lists are written from the
    registry (a registration names one; the import of the built-in modules names modules)."""
    import re

    names = ("sam", "gsam", "fsam", "looksam", "momentum", "functional", "flat_lora")
    files = [*sorted((ROOT / "hf_msam" / "methods").glob("*.py")), ROOT / "hf_msam" / "training_args.py"]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith(("from ", "import ")):
                continue
            named = {n for n in names if re.search(rf"(?<![\w-]){n}(?![\w-])", line)}
            if len(named) >= 3:
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_field_defaults_are_the_defaults_module_and_the_methods_settings():
    fields = MSAMArguments.__dataclass_fields__
    for name, f in fields.items():
        assert f.default == msam_default(name) == method_default(name), name
    assert fields["msam_gsam_alpha"].default == REGISTRY["gsam"].setting("alpha").default == 0.1
    assert fields["msam_flat_lora_schedule"].default == "cosine" and fields["msam_looksam_k"].default == 5
    with pytest.raises(AttributeError, match="no mSAM setting 'msam_nope'"):
        method_default("msam_nope")


# ---------------------------------------------------------------------------------------------
# Other routes: TRL configs, plain TrainingArguments, `hf-msam run`
# ---------------------------------------------------------------------------------------------


def test_trl_configs_take_method_args():
    pytest.importorskip("trl")
    from hf_msam.trl import MSAMSFTConfig

    common = dict(output_dir="unused", use_cpu=True, report_to="none")
    config = MSAMSFTConfig(msam_method="looksam", msam_method_args="k=3,alpha=0.1", **common)
    assert config.msam_method_args == {"k": "3", "alpha": "0.1"}
    assert repr(build_method("looksam", config)[1]) == "LookSAMDescent(k=3, alpha=0.1)"
    with pytest.raises(ValueError, match="--msam_looksam_k 3 and --msam_method_args k=4 both set k of --msam_method looksam"):
        MSAMSFTConfig(msam_method="looksam", msam_looksam_k=3, msam_method_args={"k": 4}, **common)
    (parsed_config,) = HfArgumentParser(MSAMSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--msam_method", "gsam", "--msam_method_args", "alpha=0.3", "--use_cpu", "--report_to", "none"]
    )
    assert parsed_config.msam_method_args == {"alpha": "0.3"}


def test_plain_training_arguments_read_no_method_args(tmp_path):
    trainer = MSAMTrainer(model=MLP(), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    assert repr(trainer.msam_perturbation) == "SAMPerturbation(rho=0.05, eps=1e-12)"


def test_the_launcher_passes_method_args_through(tmp_path):
    from hf_msam.launcher import format_msam_flags, parse_msam_flags, patched_transformers

    flags, rest = parse_msam_flags(["--msam_method", "gsam", "--msam_method_args", "alpha=0.3", "--output_dir", str(tmp_path)])
    assert flags == {"msam_method": "gsam", "msam_method_args": "alpha=0.3"} and rest == ["--output_dir", str(tmp_path)]
    assert parse_msam_flags(format_msam_flags(flags))[0] == flags  # what a relaunch (accelerate, torchrun) reads back
    with patched_transformers(flags):
        import transformers

        args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")  # the script's own
    assert (args.msam_method, args.msam_method_args) == ("gsam", {"alpha": "0.3"})
    assert repr(build_method("gsam", args)[1]) == "GSAMDescent(alpha=0.3)"


def test_the_launcher_leaves_a_script_methods_settings_to_the_script(tmp_path):
    from hf_msam.launcher import check_msam_flags

    script = tmp_path / "train.py"
    script.write_text("from hf_msam import register_method\n")
    check_msam_flags({"msam_method": "scaled", "msam_method_args": "factor=0.25"}, origin=str(script))


# ---------------------------------------------------------------------------------------------
# --msam_precondition adam with an optimizer without a second moment: refused when the trainer is built
# ---------------------------------------------------------------------------------------------


def precondition_args(tmp_path, **kwargs):
    return trainer_args(tmp_path, 4, 1, msam_precondition="adam", **kwargs)


@pytest.mark.parametrize("method", ["sam", "functional"])
def test_precondition_adam_with_optim_sgd_is_refused_when_the_trainer_is_built(tmp_path, method):
    with pytest.raises(ValueError, match=r"--msam_precondition adam .* and SGD \(--optim\) keeps no second moment: use an "
                       r"Adam-type optimizer"):  # fmt: skip
        MSAMTrainer(model=mlp(), args=precondition_args(tmp_path, msam_method=method, optim="sgd"))
    with pytest.raises(ValueError, match="Adafactor .* keeps no second moment"):
        MSAMTrainer(model=mlp(), args=precondition_args(tmp_path, msam_method=method, optim="adafactor"))
    given = torch.optim.SGD(mlp().parameters(), lr=LR)  # the optimizer given decides, not --optim
    with pytest.raises(ValueError, match="SGD .* keeps no second moment"):
        MSAMTrainer(model=mlp(), args=precondition_args(tmp_path, optim="adamw_torch"), optimizers=(given, None))
    model = mlp()
    adam = torch.optim.Adam(model.parameters())
    MSAMTrainer(model=model, args=precondition_args(tmp_path, optim="sgd"), optimizers=(adam, None))
    MSAMTrainer(model=mlp(), args=precondition_args(tmp_path, optim="adamw_torch"))
    MSAMTrainer(model=mlp(), args=precondition_args(tmp_path, optim="sgd", msam_rho=0.0))  # mSAM off: the plain Trainer


def test_precondition_with_a_custom_create_optimizer_is_checked_at_the_first_step(tmp_path):
    class OwnOptimizer(MSAMTrainer):
        def create_optimizer(self, model=None):
            self.optimizer = self.optimizer or torch.optim.SGD(self.model.parameters(), lr=LR)
            return self.optimizer

    trainer = OwnOptimizer(model=mlp(), args=precondition_args(tmp_path, optim="adamw_torch"), train_dataset=mlp_dataset(4))
    before = flat(params_of(trainer.model)).detach().clone()
    with pytest.raises(ValueError, match="SGD .* keeps no second moment"):
        trainer.train()
    assert torch.equal(flat(params_of(trainer.model)), before)  # refused before any weight moved


# ---------------------------------------------------------------------------------------------
# Import circles: the registry imports none of its users
# ---------------------------------------------------------------------------------------------


def test_the_registry_and_the_sam_rules_make_no_import_circle():
    tool = ROOT.parent / "shared" / "tools" / "import_circles.py"
    if not tool.exists():
        pytest.skip(f"{tool} is not there")
    proc = subprocess.run([sys.executable, str(tool), "hf_msam"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    circles = [set(c) for c in json.loads(proc.stdout)["circles"]]
    for pair in ({"hf_msam.methods", "hf_msam.training_args"}, {"hf_msam.methods.sam", "hf_msam.methods.precondition"}):
        assert not any(pair <= c for c in circles), (pair, circles)


def test_the_registry_imports_only_the_rules_and_the_defaults():
    """Checked in the source too (imports inside functions included), where the tool above is not available."""
    imported = {}
    for name in ("registry", "base", "sam"):
        tree = ast.parse((ROOT / "hf_msam" / "methods" / f"{name}.py").read_text())
        imported[name] = {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert imported == {"registry": {"..defaults", ".base"}, "base": set(), "sam": {"..ops", ".base"}}
    defaults = ast.parse((ROOT / "hf_msam" / "defaults.py").read_text())
    assert not [n for n in ast.walk(defaults) if isinstance(n, ast.ImportFrom) and (n.level or "hf_msam" in (n.module or ""))]
