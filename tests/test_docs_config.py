"""Every config key the documentation shows exists: each ``python run.py ...`` command of README.md
and docs/*.md, and each dotted ``key.sub=value`` in inline code, composes (Hydra's compose API on
conf/, the first value of a swept key)."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import qaf.config  # noqa: F401  (registers the resolvers)
from qaf.cli import expand_shorthand

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A dotted override in inline code: ``method.clip=mse``, ``+method.min_rank=1``, ``hydra.launcher.x=1``.
DOTTED = re.compile(r"\+?[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+=\S+")
_ABSENT = object()
#: Values the text stands for (``N``, ``NAME``, ``...``, ``<path>``, ``my_project``): not real keys' values.
PLACEHOLDER = re.compile(r"\.\.\.|[<>()]|\b[A-Z]+\b|\bmy_")


def first_value(override: str) -> str:
    """``key=a,b`` -> ``key=a`` (a sweep's first job); commas inside brackets stay."""
    key, _, value = override.partition("=")
    depth = 0
    for i, char in enumerate(value):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            return f"{key}={value[:i]}"
    return override


def commands(text: str) -> list[list[str]]:
    """The overrides of each ``python run.py`` command in ``text`` (continued lines joined, comments,
    flags and ``...`` dropped)."""
    found = []
    for match in re.finditer(r"python run\.py([^`|\n]*)", text.replace("\\\n", " ")):
        args = shlex.split(match.group(1).split("#")[0])
        found.append([first_value(a) for a in expand_shorthand(args) if "=" in a and not a.startswith("-")])
    return found


def inline_keys(text: str) -> list[str]:
    """Dotted overrides written in inline code (not commands), placeholders left out."""
    spans = [s for s in re.findall(r"`([^`\n]+)`", text) if "python" not in s]
    tokens = [t.rstrip(".,;:") for s in spans for t in s.split()]
    return [first_value(t) for t in tokens if DOTTED.fullmatch(t) and not PLACEHOLDER.search(t)]


def composes(overrides: list[str] | tuple[str, ...]) -> str | None:
    """None when ``python run.py OVERRIDES`` composes, else Hydra's first line."""
    try:
        composed(tuple(overrides))
    except Exception as err:  # noqa: BLE001 - the message is the test's report
        return str(err).splitlines()[0]
    return None


@functools.cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """The config of ``python run.py OVERRIDES`` with its ``hydra`` node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def key_exists(override: str) -> bool:
    """Whether the key of ``override`` exists under some option of its group (``data.decoder``: in
    ``data=imagenet``), or, for ``+key``, its parent does; a ``hydra.*`` key composes as written."""
    key = override.partition("=")[0]
    if key.startswith("hydra."):
        return composes([override]) is None
    plain = key.lstrip("+")
    path = plain.rpartition(".")[0] if key.startswith("+") else plain
    group = path.split(".")[0]
    choices = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")) if group != "hydra" else []
    bases = [(f"{group}={choice}",) for choice in choices] or [()]
    return any(OmegaConf.select(composed(base), path, default=_ABSENT) is not _ABSENT for base in bases)


def test_the_docs_show_commands_and_keys() -> None:
    # The scan finds what it checks (a broken pattern would pass every doc).
    assert sum(len(commands(p.read_text())) for p in DOCS) > 30
    assert "method.include=[layer3.8.conv2]" in {o for p in DOCS for c in commands(p.read_text()) for o in c}
    assert "+method.min_rank=1" in {k for p in DOCS for k in inline_keys(p.read_text())}
    assert key_exists("data.decoder=pil") and key_exists("+method.min_rank=1")
    assert not key_exists("data.nosuch=1") and not key_exists("+nosuch.key=1") and not key_exists("model.pretrain=x")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_composes(doc: Path) -> None:
    bad = {" ".join(c): error for c in commands(doc.read_text()) if (error := composes(c))}
    assert not bad, bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_key_exists(doc: Path) -> None:
    bad = [key for key in dict.fromkeys(inline_keys(doc.read_text())) if not key_exists(key)]
    assert not bad, bad
