"""Every file the repository names exists in it, and nothing points outside it.

Docs, docstrings and comments name files ("see ninpy/shapes.py", "kernels/*.cu", "[recipes.md](recipes.md)");
a learner who follows one must find it. Checked in every text file of the repository:
- markdown links `[text](target)` in the .md files, relative to the file's folder;
- paths that start with one of the repository's folders (ninpy/, kernels/, tests/, docs/,
  benchmarks/), relative to the root, with `*` matched as a glob;
- bare names of markdown files (`design.md`), next to the file that names them, at the root or in
  docs/;
- and no reference to a folder beside the repository or to a developers-only design file.
A placeholder (`kernels/FILE.cu`) must match at least one file. This file names missing files on
purpose and is not checked; neither are the few names in DELIBERATELY_MISSING, which tests use as
made-up paths.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".cu", ".toml", ".txt", ".cfg"}
FOLDERS = ("ninpy", "kernels", "tests", "docs", "benchmarks")

REPO_PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./*-]*)" % "|".join(FOLDERS))
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
MARKDOWN_NAME = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", r"/work/", r"\bspec/"]))
DELIBERATELY_MISSING = {"tests/test_kernels_compile.py": {"kernels/broken.cu"}}  # a made-up source
# Capitalised words that stand for any file in a pattern such as "kernels/FILE.cu:LINE".
PLACEHOLDER = re.compile(r"(?<=/)(?:FILE|NAME)(?=\.)")


def _repository_files():
    """The files git tracks, plus new ones not ignored (so the test sees what a commit would hold)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return sorted(ROOT / name for name in listed.stdout.splitlines()
                  if Path(name).suffix in TEXT_SUFFIXES and (ROOT / name).is_file()
                  and ROOT / name != Path(__file__).resolve())


FILES = _repository_files() if (ROOT / ".git").exists() else []


def _exists(path_text, base):
    path_text = path_text.rstrip(".").split("#")[0]
    if not path_text:
        return True
    path_text = PLACEHOLDER.sub("*", path_text)
    if "*" in path_text:
        return any(base.glob(path_text))
    return (base / path_text).exists()


def _named_paths(path):
    """(line number, path as written, folder it is relative to) for every path `path` names."""
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        for match in REPO_PATH.finditer(line):
            yield number, match.group(1), ROOT
        for match in MARKDOWN_NAME.finditer(line):
            name = match.group(1)
            bases = [path.parent, ROOT, ROOT / "docs"]
            yield number, name, next((b for b in bases if (b / name).exists()), path.parent)
        if path.suffix == ".md":
            for match in MARKDOWN_LINK.finditer(line):
                target = match.group(1)
                if not re.match(r"[a-z]+:|#", target):
                    yield number, target, path.parent


def test_the_repository_is_listed():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert any(p.name == "design.md" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_every_named_path_exists(path):
    allowed = DELIBERATELY_MISSING.get(str(path.relative_to(ROOT)), set())
    missing = [f"{path.relative_to(ROOT)}:{number}: {named}"
               for number, named, base in _named_paths(path)
               if not _exists(named, base) and named not in allowed]
    assert not missing, "names of files that are not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_nothing_points_outside_the_repository(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "points outside the repository:\n" + "\n".join(hits)


def test_the_checker_finds_a_missing_file(tmp_path):
    """The checker itself: a file naming a missing module and a missing design file is caught."""
    # The made-up names are built from pieces, so that this file names no missing file itself.
    design, absent, md = "DESIGN", "absent", ".md"
    doc = tmp_path / ("scratch" + md)
    doc.write_text(f"See ninpy/not_there.py, {design}{md} and [x]({absent}{md}); ninpy/shapes.py "
                   "is real.\n")
    named = [(name, base) for _, name, base in _named_paths(doc)]
    missing = sorted({name for name, base in named if not _exists(name, base)})
    assert missing == [design + md, absent + md, "ninpy/not_there.py"]
    outside = "see ../" + "shared/" + design + md
    assert OUTSIDE.search(outside) and not OUTSIDE.search("see docs/design.md")
