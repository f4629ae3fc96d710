"""The README and the pages in docs/ name only repository paths that exist, the README stays a
short user guide, and the packaging metadata agrees with itself. Plain Python: no ComfyUI.

Paths are read from inline code, fenced code blocks and markdown links. In code, a word counts as
a repository path when it starts with one of the repository's top-level folders or is one of its
top-level files (relative to the repository root); a link counts when it is not a URL (relative
to the page, as GitHub resolves it). ``<placeholder>`` and ``*`` parts are matched with glob;
``::test_name`` must name a test in that file; ``#anchor`` on a link to a page must name one of
its headings (or an explicit ``id``).
"""
import glob
import os
import re
import struct

import pytest

from asdm.harness import graphs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
README_MAX_BYTES = 12 * 1024
TOP_DIRS = ("asdm/", "nodes/", "scripts/", "benchmarks/", "tests/", "example_workflows/", "docs/", "weights/")
TOP_FILES = ("README.md", "LICENSE", "pyproject.toml", "requirements.txt", "requirements-dev.txt")

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages():
    found = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return [os.path.relpath(p, ROOT) for p in found]


def split_code(text):
    """(prose, code): fenced blocks go to code whole, inline code spans too."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
        else:
            code.extend(CODE_SPAN.findall(line))
            prose.append(CODE_SPAN.sub(" ", line))
    return "\n".join(prose), "\n".join(code)


def code_paths(code):
    """Words of code that name a repository path, as written (``::test`` and ``#anchor`` kept)."""
    out = []
    for word in code.split():
        word = word.strip("\"'()[]{},;")
        if "=" in word and not word.startswith(TOP_DIRS):
            word = word.rsplit("=", 1)[1].strip("\"'")
        word = word.rstrip(".,;:)")
        if word.startswith(TOP_DIRS) or word.split("::")[0].split("#")[0] in TOP_FILES:
            out.append(word)
    return out


def link_targets(prose):
    return [t for t in LINK.findall(prose) if not URL.match(t) and not t.startswith("#")]


def anchors(md_file):
    """GitHub's heading anchors of a page, and explicit ids."""
    text = split_code(open(md_file, encoding="utf-8").read())[0]
    found = set(re.findall(r"""id=["']([^"']+)["']""", text))
    raw = open(md_file, encoding="utf-8").read()
    fenced = False
    for line in raw.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            title = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def check(path_in_repo, base=ROOT):
    """None when the path exists (and its ::test or #anchor too), else why not."""
    path, _, test = path_in_repo.partition("::")
    path, _, anchor = path.partition("#")
    pattern = re.sub(r"<[^>]*>", "*", path)
    full = os.path.normpath(os.path.join(base, pattern))
    if not full.startswith(ROOT):
        return "outside the repository"
    matches = glob.glob(full) if "*" in pattern else ([full] if os.path.exists(full) else [])
    if not matches:
        return "no such file or folder"
    if test:
        name = test.split("[")[0]
        if not any(re.search(rf"^\s*def {re.escape(name)}\(", open(m, encoding="utf-8").read(), re.M)
                   for m in matches if os.path.isfile(m)):
            return f"no test {name} in it"
    if anchor and full.endswith(".md") and anchor not in anchors(full):
        return f"no anchor #{anchor} in it"
    return None


def missing_paths(page):
    """(written, why) for each repository path a page names that does not exist."""
    full = os.path.join(ROOT, page)
    prose, code = split_code(open(full, encoding="utf-8").read())
    bad = []
    for written in code_paths(code):
        why = check(written)
        if why:
            bad.append((written, why))
    for target in link_targets(prose):
        why = check(target, base=os.path.dirname(full))
        if why:
            bad.append((target, why))
    return bad


@pytest.mark.parametrize("page", pages())
def test_named_paths_exist(page):
    bad = missing_paths(page)
    assert not bad, f"{page} names paths that do not exist: {bad}"


def test_the_check_finds_a_bad_path(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `bash scripts/no_such_script.sh`; see [the guide](docs/nowhere.md), "
                    "`tests/unit/test_docs.py::test_no_such_test` and "
                    "[this](README.md#no-such-heading).\n```\npython benchmarks/missing.py\n```\n"
                    "Fine: `scripts/test.sh`, `docs/*.md`, `benchmarks/<name>.py`, `out/anything`.\n")
    prose, code = split_code(page.read_text())
    found = [w for w in code_paths(code) if check(w)] + [t for t in link_targets(prose) if check(t)]
    assert found == ["scripts/no_such_script.sh", "tests/unit/test_docs.py::test_no_such_test",
                     "benchmarks/missing.py", "docs/nowhere.md", "README.md#no-such-heading"]


def test_readme_is_a_short_guide():
    size = os.path.getsize(README)
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to docs/ (limit {README_MAX_BYTES})"
    text = open(README, encoding="utf-8").read()
    # CI runs .ci/run, which runs the README's test command; a fresh machine needs both commands
    assert "bash scripts/test.sh" in text and "bash scripts/main.sh" in text


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement_names(lines):
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower().replace("_", "-") for r in lines}


def test_requirements_match_pyproject_and_leave_torch_to_comfyui():
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        reqs = [line.split("#")[0].strip() for line in f]
    reqs = [r for r in reqs if r]
    deps = _pyproject()["project"]["dependencies"]
    assert sorted(reqs) == sorted(deps)
    assert not _requirement_names(reqs) & {"torch", "torchvision", "torchaudio"}


def test_one_name_and_registry_metadata():
    meta = _pyproject()
    project, comfy = meta["project"], meta["tool"]["comfy"]
    title = open(README, encoding="utf-8").readline().lstrip("#").strip()
    assert comfy["DisplayName"] == title
    assert title in project["description"]
    # the registry's node id: no "ComfyUI", letters / digits with single - _ . between
    assert "comfy" not in project["name"].lower()
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"])
    assert comfy["PublisherId"] and comfy["requires-comfyui"]
    assert os.path.isfile(os.path.join(ROOT, project["license"]["file"]))
    repo = project["urls"]["Repository"]
    assert f"git clone {repo}\n" in open(README, encoding="utf-8").read()
    raw = repo.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(raw)
    icon = os.path.join(ROOT, comfy["Icon"][len(raw):])
    with open(icon, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width <= 800 and height <= 400   # the registry's icon limit


@pytest.mark.parametrize("name", graphs.bundled())
def test_bundled_graph_has_a_thumbnail_and_a_screenshot(name):
    """The template browser shows <name>.jpg beside the graph; docs/screenshots holds the browser
    test's screenshot of it (both made by tests/e2e/test_browser.py, docs/testing.md)."""
    stem = name[:-len(".json")]
    with open(os.path.join(graphs.EXAMPLES, stem + ".jpg"), "rb") as f:
        assert f.read(3) == b"\xff\xd8\xff", "not a JPEG"
    with open(os.path.join(ROOT, "docs", "screenshots", stem + ".png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_stale_thumbnails_or_screenshots():
    stems = {n[:-len(".json")] for n in graphs.bundled()}
    thumbs = {f.rsplit(".", 1)[0] for f in os.listdir(graphs.EXAMPLES) if not f.endswith(".json")} - {"api"}
    shots = {f.rsplit(".", 1)[0] for f in os.listdir(os.path.join(ROOT, "docs", "screenshots"))}
    assert thumbs == stems and shots == stems, (thumbs ^ stems, shots ^ stems)
