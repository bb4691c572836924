"""The README and docs/: every relative link and anchor resolves, every named config exists, the README is short.

Anchors are matched against GitHub's heading slugs (lower case, punctuation dropped, spaces to hyphens, ``-1``,
``-2`` ... for repeated headings). Config paths are the ``configs/...`` paths written anywhere in the text, code
included: ``{a,b}`` alternatives are expanded and ``*`` must match at least one file.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# The two commands the README must hold verbatim, as CI (.ci/run) and the fresh-venv check extract them.
COMMANDS = {
    r'pip install -e \. && zoo fit --config [^`]+': "pip install -e . && zoo fit --config configs/quickstart.yaml",
    r'pip install -e "\.\[test\]" && pytest[^`]*': 'pip install -e ".[test]" && pytest',
}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_INLINE_CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.DOTALL)  # within one paragraph
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONFIG = re.compile(r"(?<![\w/.-])configs/[A-Za-z0-9_./{},*-]*")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def _heading_text(raw: str) -> str:
    """The text GitHub renders for a heading's Markdown: links and images as their text, no code or emphasis marks,
    no HTML tags."""
    text = _INLINE_CODE.sub(lambda m: m.group(2).strip(), raw)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("*", "").strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): lower case, letters, digits, marks, ``_``, ``-`` and spaces
    kept, then spaces turned into hyphens."""
    kept = (c for c in heading.lower() if unicodedata.category(c)[0] in "LNM" or c in " _-")
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of a Markdown file give on GitHub (repeated slugs get ``-1``, ``-2`` ...)."""
    lines = _prose_lines(path.read_text(encoding="utf-8"))
    headings = []
    previous: tuple[int, str] | None = None
    for number, line in lines:
        atx = _ATX.match(line)
        if atx:
            headings.append(atx.group(2) or "")
        elif (_SETEXT.match(line) and previous is not None and previous[0] == number - 1 and previous[1].strip()
              and not previous[1].lstrip().startswith(("|", "-", "*", "+", ">", "#"))):
            headings.append(previous[1].strip())
        previous = (number, line)
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in headings:
        base = slug(_heading_text(heading))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and link definition outside code; a link's text may run
    over a line break."""
    lines = path.read_text(encoding="utf-8").splitlines()
    prose = dict(_prose_lines("\n".join(lines)))
    out = []
    for number, line in prose.items():
        definition = _DEFINITION.match(line)
        if definition:
            out.append((number, definition.group(1)))
    # fenced code blanked out (line numbers kept), then inline code spans, which may also run over a line break
    text = "\n".join(prose.get(n, "") for n in range(1, len(lines) + 1))
    text = _INLINE_CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    out += [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _LINK.finditer(text)]
    return sorted(out)


def _expand_braces(pattern: str) -> list[str]:
    """``a{b,c}d{e,f}`` → abde, abdf, acde, acdf (one level of braces, as the docs write them)."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def config_paths(path: Path) -> list[tuple[int, str]]:
    """(line number, path) of every ``configs/...`` path in a file, code blocks and inline code included."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        out += [(number, m.group(0).rstrip(".,")) for m in _CONFIG.finditer(line)]
    return out


def check_config_path(root: Path, path: str) -> str | None:
    """None when ``path`` names what exists (a YAML file, or a folder when it ends in ``/``); else the problem."""
    if path.endswith((".yaml", ".yml")):
        missing = []
        for candidate in _expand_braces(path):
            found = list(root.glob(candidate)) if "*" in candidate else [root / candidate]
            if not any(p.is_file() for p in found):
                missing.append(candidate)
        return f"no such config: {', '.join(missing)}" if missing else None
    if path.endswith("/") and "{" not in path and "*" not in path and not (root / path).is_dir():
        return f"no such config folder: {path}"
    return None


def check_docs(files: list[Path], root: Path = ROOT, configs: bool = True) -> list[str]:
    """Every broken relative link and anchor of ``files`` (and config path, with ``configs``), as ``file:line:
    problem`` lines."""
    problems = []
    cache: dict[Path, set[str]] = {}
    root = root.resolve()
    for file in files:
        file = file.resolve()
        where = file.relative_to(root)
        for number, target in links(file):
            if not target or _SCHEME.match(target):
                continue  # external (http, https, mailto, ...)
            raw_path, _, anchor = target.partition("#")
            path = urllib.parse.unquote(raw_path)
            resolved = (file.parent / path).resolve() if path else file
            if root not in (resolved, *resolved.parents):
                problems.append(f"{where}:{number}: link {target!r} leaves the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where}:{number}: link {target!r}: no such file {resolved.relative_to(root)}")
                continue
            if anchor:
                if resolved.suffix.lower() != ".md" or not resolved.is_file():
                    problems.append(f"{where}:{number}: link {target!r}: anchors are checked in Markdown files only")
                    continue
                if resolved not in cache:
                    cache[resolved] = anchors(resolved)
                if urllib.parse.unquote(anchor).lower() not in cache[resolved]:
                    problems.append(f"{where}:{number}: link {target!r}: no heading #{anchor} in "
                                    f"{resolved.relative_to(root)}")
        for number, config in config_paths(file) if configs else []:
            problem = check_config_path(root, config)
            if problem:
                problems.append(f"{where}:{number}: {problem}")
    return problems


# ----------------------------------------------------------------------------------------------------------- tests
def test_links_anchors_and_config_paths_resolve():
    problems = check_docs(doc_files())
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def test_contributing_links_resolve():
    # its worked example names a config it asks the reader to create, so only the links are checked
    problems = check_docs([ROOT / "CONTRIBUTING.md"], configs=False)
    assert not problems, "broken links in CONTRIBUTING.md:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_holds_the_two_commands_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for pattern, command in COMMANDS.items():
        match = re.search(pattern, readme)
        assert match is not None and match.group(0) == command, f"README.md must hold `{command}`"
        assert f"\n`{command}`\n" in readme, f"`{command}` must stand in backticks on a line of its own"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("KD++ and DKD++ (ND)", "kd-and-dkd-nd"),
        ("MEAL V2", "meal-v2"),
        ("Stage 1: experts", "stage-1-experts"),
        ("`zoo checkpoints publish`", "zoo-checkpoints-publish"),
        ("Classification on digits: top-1 %", "classification-on-digits-top-1-"),
        ("LLaVA-KD (Cai et al., arXiv 2410.16236)", "llava-kd-cai-et-al-arxiv-241016236"),
        ("Training throughput on a GPU (NVIDIA H200)", "training-throughput-on-a-gpu-nvidia-h200"),
        ("MAE → ViT × 2", "mae--vit--2"),
    ],
)
def test_slugs_follow_github(heading, expected):
    assert slug(_heading_text(heading)) == expected


def test_the_check_finds_broken_links(tmp_path):
    (tmp_path / "configs" / "a").mkdir(parents=True)
    (tmp_path / "configs" / "a" / "kd.yaml").write_text("model: {}\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Two words\n\n## Two words\n\n```\n# not a heading\n```\n")
    good = (
        "# Title\n\n## Here\n\n[page](docs/page.md), [anchor](docs/page.md#two-words), "
        "[repeat](docs/page.md#two-words-1), [self](#here), [web](https://example.com/x.md#nowhere), "
        "`[code](nowhere.md)`, `configs/a/kd.yaml`, `configs/a/{kd}.yaml`, `configs/a/*.yaml`, `configs/a/`,\n"
        "[a link over\ntwo lines](docs/page.md#page) and one in `code\n[spanning](nowhere.md) lines`\n"
        "```\nzoo fit --config configs/a/kd.yaml  # [in code](nowhere.md)\n```\n"
    )
    (tmp_path / "README.md").write_text(good)
    files = [tmp_path / "README.md", tmp_path / "docs" / "page.md"]
    assert check_docs(files, tmp_path) == []

    broken = (
        "# Title\n\n[missing](docs/gone.md)\n[bad anchor](docs/page.md#three-words)\n[bad self](#nowhere)\n"
        "[not a heading](docs/page.md#not-a-heading)\n[outside](../elsewhere.md)\n[over two\nlines](docs/gone2.md)\n"
        "`configs/a/dkd.yaml` and `configs/a/{kd,dkd}.yaml` and `configs/b/*.yaml` and `configs/c/`\n"
        "```\nzoo fit --config configs/a/gone.yaml\n```\n"
    )
    (tmp_path / "README.md").write_text(broken)
    problems = check_docs(files, tmp_path)
    assert len(problems) == 11, "\n".join(problems)
    expected_problems = ("docs/gone.md", "docs/gone2.md", "#three-words", "#nowhere", "#not-a-heading",
                         "leaves the repository", "configs/a/dkd.yaml", "configs/b/*.yaml", "configs/c/",
                         "configs/a/gone.yaml")
    for expected in expected_problems:
        assert any(expected in p for p in problems), f"{expected} not reported:\n" + "\n".join(problems)
