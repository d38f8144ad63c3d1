"""The documentation stays true: every relative link in the README and docs/ resolves, every path
docs/design.md names exists, and docs/configs.md is what `mmtrain config-reference` prints."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a path in backticks that starts at a top-level folder of the repository
PATH = re.compile(
    r"`((?:mmtrain|kernels|tests|configs|slurm|launch|docs|benchmarks)/[\w./-]*\w)(?:::\w+)?`"
)


def relative_links(page: Path):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or a link within the page
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_every_path_the_design_note_names_exists():
    text = (REPO / "docs" / "design.md").read_text()
    named = set(PATH.findall(text))
    assert len(named) > 10  # the note does name the code it explains
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/design.md names paths that do not exist: {missing}"


def test_the_config_reference_is_current():
    from mmtrain.reference import reference

    page = (REPO / "docs" / "configs.md").read_text()
    assert page == reference(), (
        "docs/configs.md differs from the code's config keys: regenerate it with "
        "`mmtrain config-reference --out docs/configs.md`"
    )
    assert "`train.global_batch_size`" in page and "`recipe.data.shuffle_shards`" in page
