"""The generated pages of the documentation site (mkdocs.yml names this file under `hooks:`).

- `index.md`, the home page: README.md, its links into docs/ made site links (one source: the README).
- `architecture.md`: ARCHITECTURE.md as it is.
- `flags.md`: every `--msam_*` flag, read from the fields of `MSAMArguments` (name, type, default, help).
- `methods/index.md` and `methods/NAME.md`: the registered methods, read from hf_msam's registry when the site is
  built (`methods_table()`, `REGISTRY`): each method's paper, cost, settings (its factory's keyword parameters, with
  type and default), the flags it reads and what it combines with. The nav gets one entry per method after
  `methods/index.md`, so no page lists the methods by hand.

`generated_pages()` is what the tests read (tests/tools/test_doc_blocks.py checks the code blocks of every page).
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # document the checkout being built, whatever hf_msam is installed
    sys.path.insert(0, str(ROOT))
METHODS_INDEX = "methods/index.md"

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _site_link(target: str) -> str | None:
    """Where a link of README.md or ARCHITECTURE.md (relative to the repository root) points in the site: None for a
    file the site does not hold."""
    if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        return target
    path, _, anchor = target.partition("#")
    anchor = f"#{anchor}" if anchor else ""
    if path.startswith("docs/"):
        return path[len("docs/"):] + anchor
    if path == "ARCHITECTURE.md":
        return "architecture.md" + anchor
    if path == "README.md":
        return "index.md" + anchor
    return None


def _relink(text: str) -> str:
    """README.md's links as the site's; a link to a repository file outside the site becomes its text."""

    def replace(match: re.Match) -> str:
        bang, label, target = match.groups()
        new = _site_link(target)
        if new is not None:
            return f"{bang}[{new if label == target else label}]({new})"
        if label == target:  # a path shown as the link's text: the file in the repository, in code font
            return f"`{label}`"
        return label

    return _LINK.sub(replace, text)


def home_page() -> str:
    return _relink((ROOT / "README.md").read_text(encoding="utf-8"))


def architecture_page() -> str:
    return _relink((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))


def _first_paragraph(doc: str | None) -> str:
    return " ".join((inspect.cleandoc(doc or "").split("\n\n") or [""])[0].split())


def _capabilities(name: str) -> list[tuple[str, bool]]:
    """What `name` combines with, read off the rules its factory builds with the default settings."""
    from hf_msam.methods import Capabilities, build_method

    caps = Capabilities.of(*build_method(name))
    try:
        adaptive = Capabilities.of(*build_method(name, msam_adaptive=True)).adaptive
    except ValueError:
        adaptive = False
    return [
        ("ASAM (`--msam_adaptive`)", adaptive),
        ("synchronized perturbations (`--msam_sync_perturbation`)", caps.sync_perturbation),
        ("FSDP2", caps.fsdp2),
        ("the vectorized step (`--msam_vectorize`)", caps.vectorized),
        ("`--msam_interval`", caps.interval),
        ("reads the optimizer's state", caps.needs_optimizer_state),
    ]


def method_page(name: str) -> str:
    from hf_msam.methods import REGISTRY, build_method

    method = REGISTRY[name]
    module = inspect.getmodule(method.build)
    lines = [f"# `{name}`", "", f"`--msam_method {name}`", ""]
    if method.paper:
        lines += [f"**Paper:** {method.paper}  "]
    if method.cost:
        lines += [f"**Cost:** {method.cost}  "]
    lines += [f"**Registered in:** `{module.__name__}`", "", "## Settings", ""]
    if method.settings:
        example = ",".join(f"{s.name}={s.default}" for s in method.settings)
        lines += [
            f'Given as `--msam_method_args "{example}"` (a dict in Python: `msam_method_args={{...}}`).',
            "",
            "| setting | type | default | also set by |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| `{s.name}` | `{s.type.__name__}` | `{s.default!r}` | {f'`--{s.flag}`' if s.flag else '—'} |"
                  for s in method.settings]  # fmt: skip
    else:
        lines += [f"None of its own: leave `--msam_method_args` empty for `{name}`."]
    flags = ", ".join(f"`--{f}`" for f in method.flags) or "none"
    lines += ["", f"**Flags it reads:** {flags}", "", "## Combines with", "", "| | |", "| --- | --- |"]
    lines += [f"| {what} | {'yes' if ok else 'no'} |" for what, ok in _capabilities(name)]
    perturbation, descent = build_method(name)
    lines += ["", "## The rules", "", "With the default settings the factory builds:", ""]
    for rule in (perturbation, descent):
        kind = type(rule)
        lines += [f"- `{kind.__module__}.{kind.__qualname__}`: {_first_paragraph(kind.__doc__)}"]
    if module.__doc__:
        lines += ["", f"From the docstring of `{module.__name__}`:", "", inspect.cleandoc(module.__doc__)]
    lines += ["", "See [the overview](../methods.md) for what every method shares and what the trainer refuses, and "
              "[the evidence](../evidence.md) for where the methods helped in our studies and where nothing did."]
    return "\n".join(lines) + "\n"


def methods_index() -> str:
    from hf_msam.methods import methods_table

    lines = [
        "# All registered methods",
        "",
        "Generated from the registry (`hf_msam.methods.methods_table()`) when the site is built: a method added with",
        "`register_method` appears here. Pick one with `--msam_method NAME`, set its own settings with",
        '`--msam_method_args "key=value,..."`.',
        "",
        "| method | paper | settings | cost |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| [`{r.name}`]({r.name}.md) | {r.paper} | {r.settings} | {r.cost} |" for r in methods_table()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell."""
    text = " ".join(str(text).split())
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), ("`", "\\`")):
        text = text.replace(char, escaped)
    return text


def flags_page() -> str:
    import dataclasses

    from hf_msam import MSAMArguments

    lines = [
        "# Every `--msam_*` flag",
        "",
        "Generated from the fields of `MSAMArguments` (their defaults and `--help` texts) when the site is built.",
        "[The Trainer](trainer.md) explains the main ones; each method's own settings are on its page under",
        "[Methods](methods/index.md).",
        "",
        "| flag | type | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for field in dataclasses.fields(MSAMArguments):
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = field.metadata.get("help", "")
        lines.append(f"| `--{field.name}` | `{field.type}` | `{default!r}` | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def generated_pages() -> dict[str, str]:
    """Every generated page: its path in the site -> its Markdown."""
    from hf_msam.methods import method_names

    pages = {"index.md": home_page(), "architecture.md": architecture_page(), "flags.md": flags_page(),
             METHODS_INDEX: methods_index()}
    pages.update({f"methods/{name}.md": method_page(name) for name in method_names()})
    return pages


# mkdocs events ------------------------------------------------------------------------------------------------------


def on_config(config, **kwargs):
    """One nav entry per registered method, right after `methods/index.md`."""
    from hf_msam.methods import method_names

    def visit(items) -> bool:
        for i, item in enumerate(items):
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if value == METHODS_INDEX:
                items[i + 1 : i + 1] = [{name: f"methods/{name}.md"} for name in method_names()]
                return True
            if isinstance(value, list) and visit(value):
                return True
        return False

    if config.nav is not None and not visit(config.nav):
        raise ValueError(f"mkdocs.yml's nav must name {METHODS_INDEX}: the method pages go after it")
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for path, content in generated_pages().items():
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown, page, **kwargs):
    """Links of the hand-written pages to ../README.md or ../ARCHITECTURE.md point at the site's pages."""
    return markdown.replace("](../README.md", "](index.md").replace("](../ARCHITECTURE.md", "](architecture.md")
